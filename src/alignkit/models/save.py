"""Save a model and its tokenizer in Hugging Face format, atomically.

The files are written into a temporary directory beside `out_dir`, fsynced and renamed into place
(`alignkit.atomic.atomic_dir`), so a crash or full disk leaves either the old `out_dir` or the new
one, never a half-written one.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from alignkit.atomic import atomic_dir
from alignkit.errors import AlignkitError
from alignkit.models.load import record_special_token_ids
from alignkit.models.reward_model import REMOTE_MODULE
from alignkit.models.reward_normalization import remote_code_source


def save_pretrained_atomic(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | Path,
    *,
    merge_lora: bool = True,
) -> Path:
    """Write model (safetensors + config + generation config) and tokenizer to `out_dir`, atomically.

    The result loads with `AutoModelForCausalLM.from_pretrained(out_dir)` (or
    `AutoModelForSequenceClassification` for a classifier). A `peft.PeftModel` is saved with its
    adapters merged into the base weights, computed on a deep copy so that the model being trained
    keeps its adapters (this needs memory for a second copy of the model); with `merge_lora=False`
    only the adapter (`adapter_model.safetensors` + `adapter_config.json`) is saved. The pad, EOS
    and BOS ids of the tokenizer are written to the model config and generation config. Pass the
    unwrapped model (`accelerator.unwrap_model(model)`), and call this on the main process only.

    An existing `out_dir` is replaced: it is moved aside, the new directory renamed in, and the old
    one deleted; if the swap fails the old directory is moved back.

    Args:
        model: A `PreTrainedModel` or `peft.PeftModel`.
        tokenizer: Its tokenizer (saved alongside), or None.
        out_dir: Destination directory.
        merge_lora: Merge LoRA adapters into the saved weights (ignored for non-peft models).

    Returns:
        `out_dir` as a `Path`.

    Raises:
        AlignkitError: If `out_dir` exists and is not a directory.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise AlignkitError(f"cannot save the model to {out_dir}: it exists and is not a directory")
    with atomic_dir(out_dir) as tmp_dir:
        _write(model, tokenizer, tmp_dir, merge_lora=merge_lora)
    return out_dir


def _write(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None, directory: Path, *, merge_lora: bool
) -> None:
    """Write the model files (and tokenizer files) into `directory`."""
    to_save = model
    if _is_peft(model) and merge_lora:
        to_save = copy.deepcopy(model).merge_and_unload()
    if tokenizer is not None:
        record_special_token_ids(to_save.get_base_model() if _is_peft(to_save) else to_save, tokenizer)
    to_save.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)

    source = remote_code_source(to_save) if hasattr(to_save, "config") else None
    if source is not None:  # a normalised reward model: opt-in exact loading (see remote_code_source)
        (directory / f"{REMOTE_MODULE}.py").write_text(source)


def _is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)
