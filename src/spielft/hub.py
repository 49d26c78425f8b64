"""The Hugging Face Hub, as peft uses it: adapters load from a repo id and push to one.

Loading fetches only the two adapter files (``adapter_config.json``,
``adapter_model.safetensors``) and still goes through `spielft.model.read_adapter`'s
validation, never a pickle. Pushing uploads what a save callback writes into a temporary folder.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME


def resolve_adapter_dir(
    adapter: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """A local adapter folder, or the folder a Hub repo id's adapter files download to.

    As in peft, an existing local path wins; anything else that is a valid repo id
    (``user/name``) is fetched (the HF cache, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` apply).
    """
    local = Path(adapter) / (subfolder or "")
    if local.is_dir() or Path(adapter).exists():
        return local
    from huggingface_hub import snapshot_download

    try:
        check_repo_id(str(adapter))
    except ValueError:
        raise FileNotFoundError(
            f"{adapter} is not a folder, nor a Hugging Face Hub repo id (user/name)"
        ) from None
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        folder = snapshot_download(
            str(adapter),
            revision=revision,
            token=token,
            allow_patterns=[prefix + ADAPTER_CONFIG_NAME, prefix + ADAPTER_WEIGHTS_NAME],
        )
    except Exception as err:  # network, auth, missing repo or revision: say which adapter
        raise FileNotFoundError(
            f"{adapter} is not a local folder, and fetching it from the Hugging Face Hub "
            f"failed ({type(err).__name__}: {err})"
        ) from err
    fetched = Path(folder) / (subfolder or "")
    if not (fetched / ADAPTER_WEIGHTS_NAME).is_file():
        where = f"{adapter}" + (f", subfolder {subfolder!r}" if subfolder else "")
        raise FileNotFoundError(
            f"the Hub repo {where} (revision {revision or 'main'}) has no {ADAPTER_WEIGHTS_NAME}"
            + ("" if subfolder else "; adapters other than 'default' are in subfolders: pass subfolder=")
        )
    return fetched


def model_card(repo_id: str, base_model: str | None) -> str:
    """A minimal README.md: the Hub files the repo under spielft and links its base model."""
    if base_model is not None:
        try:
            check_repo_id(base_model)
        except ValueError:
            base_model = None  # a local path: not a Hub model to link
        else:
            base_model = None if Path(base_model).exists() else base_model
    header = ["---", "library_name: spielft"]
    header += [f"base_model: {base_model}"] if base_model else []
    header += ["tags:", "- spielft", "- sparse-fine-tuning", "---", ""]
    load = f'SpielModel.from_pretrained(base_model, "{repo_id}")'
    return "\n".join(header) + (
        f"\n# {repo_id}\n\nA SpIEL sparse-delta adapter made with spielft"
        + (f" for [{base_model}](https://huggingface.co/{base_model})" if base_model else "")
        + f".\n\n```python\nfrom spielft import SpielModel\nmodel = {load}\n```\n"
    )


def push_saved(
    save: Callable[[Path], None],
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Create ``repo_id`` if needed and upload what ``save(folder)`` writes; the commit info.

    ``save`` writes into a temporary folder, so nothing is uploaded unless all of it was
    written.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="spielft-push-") as tmp:
        save(Path(tmp))
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True)  # as transformers does
        return api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=tmp,
            commit_message=commit_message or "Upload with spielft",
            revision=revision,
            create_pr=create_pr,
        )


def check_repo_id(repo_id: str) -> None:
    """Raise a ValueError unless ``repo_id`` is a valid Hub repo id (``user/name``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{repo_id!r} is not a Hugging Face Hub repo id (user/name): {err}") from None
