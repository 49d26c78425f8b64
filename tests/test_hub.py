"""Hub round trips against a local stand-in for huggingface_hub (this machine is offline).

They check spielft's side: which files travel, that loading validates them as from a folder,
subfolders, and the errors; not huggingface_hub itself.
"""

import huggingface_hub
import pytest
import torch

from fake_hub import FakeHub
from spielft import SpielConfig, SpielModel, get_spiel_model
from spielft.cli.common import apply_adapter
from spielft.files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from tiny_models import tiny_llama

IDS = torch.arange(24).view(2, 12) % 64


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def trained(seed=1, adapter=None, model=None):
    model = model or get_spiel_model(tiny_llama(), SpielConfig(density=0.05))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in model.sparse_deltas(adapter).values():
            delta.values.copy_(torch.randn(delta.values.shape, generator=gen) * 0.05)
    return model


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_push_then_load_by_repo_id(hub):
    model = trained()
    model.add_adapter("task", SpielConfig(density=0.02, seed=3))
    trained(seed=2, adapter="task", model=model)
    info = model.push_to_hub("me/sparse", commit_message="first")
    assert info.commit_url.endswith("/commit/1") and hub.commits[0][1]["commit_message"] == "first"
    assert (hub.root / "me/sparse" / ADAPTER_WEIGHTS_NAME).is_file()  # as save_pretrained lays out
    assert (hub.root / "me/sparse/task" / ADAPTER_WEIGHTS_NAME).is_file()

    loaded = SpielModel.from_pretrained(tiny_llama(), "me/sparse", revision="v1")
    assert hub.downloads[-1] == ("me/sparse", "v1", (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME))
    assert torch.equal(logits(loaded), logits(model))
    loaded.load_adapter("me/sparse", "task", subfolder="task")
    assert hub.downloads[-1][2] == (f"task/{ADAPTER_CONFIG_NAME}", f"task/{ADAPTER_WEIGHTS_NAME}")
    loaded.set_adapter("task")
    model.set_adapter("task")
    assert torch.equal(logits(loaded), logits(model))
    # The CLI's --adapter takes a repo id too.
    from_cli = apply_adapter(tiny_llama(), "me/sparse")
    model.set_adapter("default")
    assert torch.equal(logits(from_cli), logits(model))


def test_push_options_reach_the_hub_with_a_model_card(hub):
    trained().push_to_hub("me/sparse", private=True, token="tok", revision="dev", create_pr=True)
    assert hub.repos == [("me/sparse", True, "tok")] and hub.branches == [("me/sparse", "dev")]
    assert hub.commits[0][1]["revision"] == "dev" and hub.commits[0][1]["create_pr"] is True
    card = (hub.root / "me/sparse" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: spielft\n") and 'from_pretrained(base_model, "me/sparse")' in card


def test_a_repo_without_a_top_level_adapter_says_to_pass_subfolder(hub):
    model = trained()
    model.add_adapter("task", SpielConfig(density=0.02, seed=3))
    model.push_to_hub("me/tasks", selected_adapters=["task"])
    with pytest.raises(FileNotFoundError, match=r"me/tasks \(revision main\) has no adapter_model.*subfolder="):
        SpielModel.from_pretrained(tiny_llama(), "me/tasks")
    SpielModel.from_pretrained(tiny_llama(), "me/tasks", subfolder="task")


def test_a_local_folder_wins_over_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trained().save_pretrained("me/sparse")  # a relative path that is also a valid repo id
    SpielModel.from_pretrained(tiny_llama(), "me/sparse")
    assert hub.downloads == []


def test_hub_errors_name_the_adapter(hub):
    with pytest.raises(FileNotFoundError, match=r"me/missing is not a local folder.*LocalEntryNotFoundError: no repo me/missing"):
        SpielModel.from_pretrained(tiny_llama(), "me/missing")
    with pytest.raises(FileNotFoundError, match="not a folder, nor a Hugging Face Hub repo id"):
        SpielModel.from_pretrained(tiny_llama(), "/no/such/adapter/folder")
    assert [d[0] for d in hub.downloads] == ["me/missing"]


def test_a_failed_save_uploads_nothing(hub):
    with pytest.raises(ValueError, match="unknown adapter"):
        trained().push_to_hub("me/sparse", adapter_name="nope")
    assert hub.commits == [] and not (hub.root / "me/sparse").exists()
