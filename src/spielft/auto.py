"""`AutoSpielModelForCausalLM` (and ``...ForSequenceClassification``): a saved adapter and the
base model it records, in one call.

As peft's ``AutoPeftModelForCausalLM``: the adapter names its base model
(``base_model_name_or_path``, written by `SpielModel.save_pretrained`), transformers loads it,
and `SpielModel.from_pretrained` puts the adapter on it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from transformers import (
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .default_model import default_model_path, is_default_model_folder
from .hub import check_repo_id, resolve_adapter_dir
from .model import (
    SpielModel,
    adapter_base_model,
    adapter_task_model_config,
    resize_to_adapter_vocab,
)


class _AutoSpielModel:
    """Load ``adapter`` (a folder or a Hub repo id) onto the base model it was trained on,
    built by ``_auto_class`` (a transformers auto class)."""

    _auto_class: Any = None

    @classmethod
    def from_pretrained(
        cls,
        adapter: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        **model_kwargs: Any,
    ) -> SpielModel:
        """``model_kwargs`` go to the auto class's ``from_pretrained`` (``dtype``,
        ``quantization_config``, ``device_map``, ``num_labels``...); ``revision`` is the
        adapter's."""
        folder = resolve_adapter_dir(adapter, subfolder=subfolder, revision=revision, token=token)
        base = adapter_base_model(folder)
        if base is None:
            raise ValueError(
                f"the adapter {adapter} records no base model: load the base yourself and call "
                f"SpielModel.from_pretrained(model, {str(adapter)!r})"
            )
        base = locate_base_model(base, adapter)
        if token is not None:
            model_kwargs.setdefault("token", token)
        # A classifier's labels, as its head was trained with, unless given (only classifier
        # and QA adapters record them).
        recorded = adapter_task_model_config(folder)
        if recorded and "config" in model_kwargs:  # then transformers takes no config keywords
            config = copy.deepcopy(model_kwargs["config"])
            for field, value in recorded.items():  # num_labels first: it resets id2label
                if field not in model_kwargs:
                    setattr(config, field, value)
            model_kwargs = {**model_kwargs, "config": config}
        else:
            model_kwargs = {**recorded, **model_kwargs}
        model = cls._auto_class.from_pretrained(base, **model_kwargs)
        resize_to_adapter_vocab(model, folder)  # tokens added before training
        return SpielModel.from_pretrained(model, folder, adapter_name, is_trainable)


class AutoSpielModelForCausalLM(_AutoSpielModel):
    """Load ``adapter`` (a folder or a Hub repo id) onto the causal LM it was trained on."""

    _auto_class = AutoModelForCausalLM


class AutoSpielModelForSequenceClassification(_AutoSpielModel):
    """Load ``adapter`` onto the sequence classifier it was trained on: its head is in the
    adapter (``task_type="SEQ_CLS"``), and its label settings (``num_labels``, ``id2label``,
    ``pad_token_id``...) are recorded there and applied unless passed."""

    _auto_class = AutoModelForSequenceClassification


class AutoSpielModelForTokenClassification(_AutoSpielModel):
    """As `AutoSpielModelForSequenceClassification`, for a token classifier (``"TOKEN_CLS"``)."""

    _auto_class = AutoModelForTokenClassification


class AutoSpielModelForQuestionAnswering(_AutoSpielModel):
    """As `AutoSpielModelForSequenceClassification`, for extractive QA (``"QUESTION_ANS"``)."""

    _auto_class = AutoModelForQuestionAnswering


def locate_base_model(base: str, adapter: str | os.PathLike) -> str:
    """Where to load a recorded base model from: its folder if it is here, the embedded
    default model if that is what it was (a spielft cache folder of that name), else a Hub id."""
    if Path(base).is_dir():
        return base
    if is_default_model_folder(base):
        return str(default_model_path())  # converted again here from the installed wheel
    try:
        check_repo_id(base)
    except ValueError:
        raise FileNotFoundError(
            f"the adapter {adapter} was trained on {base}, a local folder that is not on this "
            f"machine: load that model yourself and call SpielModel.from_pretrained(model, "
            f"{str(adapter)!r})"
        ) from None
    return base
