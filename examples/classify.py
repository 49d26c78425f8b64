"""A sequence classifier with SpIEL: sparse deltas in the body, the new head trained in full.

    python examples/classify.py [--regrowth ag|ma] [--steps 150]

A tiny random Llama learns which of three keyword tokens a random sequence contains
(``task_type="SEQ_CLS"`` trains its freshly initialised ``score`` head whole, as peft does),
with `SpielTrainer`; the adapter is saved and loaded back with
`AutoSpielModelForSequenceClassification`, which rebuilds the 3-label model from what the
adapter records. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForSequenceClassification, TrainingArguments
from transformers import logging as hf_logging

from spielft import (
    AutoSpielModelForSequenceClassification,
    SpielConfig,
    SpielTrainer,
    get_spiel_model,
)

KEYWORDS = (5, 6, 7)  # label i: the sequence contains KEYWORDS[i]
VOCAB, LENGTH = 64, 16


def keyword_data(n: int, seed: int) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(KEYWORDS) + 5, VOCAB, (n, LENGTH), generator=gen)
    labels = torch.randint(0, len(KEYWORDS), (n,), generator=gen)
    positions = torch.randint(0, LENGTH, (n,), generator=gen)
    ids[torch.arange(n), positions] = torch.tensor(KEYWORDS)[labels]
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


@torch.no_grad()
def predictions(model: torch.nn.Module, data: Dataset) -> torch.Tensor:
    model.eval()
    return model(input_ids=torch.tensor(data["input_ids"])).logits.argmax(-1)


def accuracy(model: torch.nn.Module, data: Dataset) -> float:
    return (predictions(model, data) == torch.tensor(data["labels"])).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--regrowth", choices=["ag", "ma"], default="ag")
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="spielft-classify-"))

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         num_labels=len(KEYWORDS), pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(work / "base")  # "a pretrained model"
    base = LlamaForSequenceClassification.from_pretrained(work / "base")
    model = get_spiel_model(base, SpielConfig(density=0.05, regrowth=args.regrowth, task_type="SEQ_CLS"))
    model.print_trainable_parameters()
    train, test = keyword_data(512, seed=1), keyword_data(256, seed=2)
    print(f"accuracy before: {accuracy(model, test):.3f}")

    trainer = SpielTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(work / "run"), max_steps=args.steps, per_device_train_batch_size=32,
            learning_rate=1e-2 if args.regrowth == "ma" else 3e-3, lr_scheduler_type="constant",
            use_cpu=True, report_to=[], save_strategy="no", logging_steps=50, disable_tqdm=True,
        ),
        train_dataset=train,
    )
    trainer.train()
    print(f"accuracy after: {accuracy(model, test):.3f}")

    model.save_pretrained(work / "adapter")
    loaded = AutoSpielModelForSequenceClassification.from_pretrained(work / "adapter")
    same = torch.equal(predictions(loaded, test), predictions(model, test))
    print(f"reloaded from {work / 'adapter'}: {loaded.config.num_labels} labels, "
          f"same predictions: {same}")


if __name__ == "__main__":
    main()
