"""Load tokenizers and Hugging Face models safely, with a distinct pad token and optional LoRA.

Every stage loads models here, so the same rules hold everywhere: the tokenizer has a pad token
distinct from EOS (embeddings are resized when one is added) and a chat template; weights are read
from safetensors only unless `--model.allow_unsafe_pickle` is set (unpickling can run arbitrary
code), and a local directory holding only pickle weights is refused before anything reads it;
`trust_remote_code` is off unless the config turns it on; a problem the user can fix raises
`AlignkitError` naming the path and the option.

A local model is checked before and after the library reads it, so a bad file is named in one line
rather than shown as a traceback: `config.json` must be a UTF-8 JSON object, the safetensors files
that will be read must have a valid header, and the loaded weights must cover the model that
`config.json` describes with the same shapes (nothing is silently re-initialised, except the new
head of a sequence classifier). Pickle weights, when allowed, are read only by torch's weights-only
loader: a file it refuses is reported, never unpickled another way.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alignkit.config import ModelConfig
from alignkit.console import main_print
from alignkit.errors import AlignkitError
from alignkit.models.weight_files import (
    UNSAFE_OPTION,
    check_safetensors_files,
    check_weight_files,
    read_json_object,
    refused_pickle_message,
)

PAD_TOKEN = "<|pad|>"
"""The pad token added to tokenizers that have none, or whose pad token is their EOS."""

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('chat roles must be system, user or assistant, got ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + (eos_token or '<|im_end|>') + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
"""ChatML-like template set on tokenizers that have none.

Each message is rendered as `<|im_start|>{role}\\n{content}{eos_token}\\n` (roles: system, user,
assistant); `add_generation_prompt=True` appends `<|im_start|>assistant\\n`. The end of a turn is the
tokenizer's own EOS, so a model stops generating at EOS without new special tokens; `<|im_start|>`
is plain text. The template emits no BOS: the tokenizer adds it when the prompt is tokenized with
`add_special_tokens=True`, so there is exactly one. It has no `{% generation %}` markers because
alignkit builds response masks by tokenizing the prompt prefix and the response separately.
"""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "tiktoken.model")
"""Files one of which a tokenizer directory must hold (the vocabulary; `tokenizer_config.json` alone is not one)."""

_JSON_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
               "added_tokens.json", "generation_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_source(name_or_path: str, option: str, allow_unsafe_pickle: bool) -> str:
    """Check a model/tokenizer source: an existing local directory (checked for safe weights) or a hub id."""
    if not name_or_path:
        raise AlignkitError(f"option `{option}` is empty: give a hub id or a local model directory")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            read_json_object(path / "config.json")
        if option == "--model.name_or_path":
            check_weight_files(path, allow_unsafe_pickle)
        return str(path)
    if path.exists():
        raise AlignkitError(
            f"option `{option}`: {name_or_path} is a file; expected a model directory or hub id"
        )
    if not _HUB_ID.match(name_or_path):
        raise AlignkitError(
            f"option `{option}`: directory {name_or_path} does not exist (and it is not a hub id like `org/name`)"
        )
    return name_or_path


def load_tokenizer(cfg: ModelConfig, *, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """Load the tokenizer with a pad token distinct from EOS and a chat template.

    The source is `cfg.tokenizer`, or `cfg.name_or_path` when that is unset. If the tokenizer has no
    pad token, or its pad token is its EOS, a special `<|pad|>` token is added (so EOS labels are
    never masked as padding); `load_causal_lm` / `load_sequence_classifier` given this tokenizer
    resize the embeddings to match. A BOS token is kept as it is. A tokenizer without a chat
    template gets `DEFAULT_CHAT_TEMPLATE`, which needs no `{% generation %}` markers because alignkit
    builds masks by tokenizing the prompt prefix and the response separately.

    Args:
        cfg: Model options (`tokenizer`, `name_or_path`, `revision`, `trust_remote_code`).
        padding_side: "right" for training, "left" for generation.

    Returns:
        The tokenizer.

    Raises:
        AlignkitError: If the source does not exist or cannot be loaded.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    option = "--model.tokenizer" if cfg.tokenizer else "--model.name_or_path"
    source = _resolve_source(cfg.tokenizer or cfg.name_or_path, option, cfg.allow_unsafe_pickle)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as err:
        raise AlignkitError(
            f"cannot load a tokenizer from `{option}` {source}: {_explain_tokenizer(err, source, cfg)}"
        ) from err
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise AlignkitError(
            f"tokenizer {source}: {PAD_TOKEN} maps to the EOS id; cannot get a distinct pad token"
        )
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def load_causal_lm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None) -> torch.nn.Module:
    """Load a causal language model (the policy or reference), optionally wrapped with LoRA.

    Args:
        cfg: Model options (`name_or_path`, `dtype`, `revision`, `trust_remote_code`,
            `allow_unsafe_pickle`, `lora_*`).
        tokenizer: The tokenizer from `load_tokenizer`; embeddings are resized to its length if it
            has more tokens (e.g. an added pad), and its pad/BOS/EOS ids are written to the configs.

    Returns:
        A `PreTrainedModel`, or a `peft.PeftModel` when `cfg.lora_r > 0`.

    Raises:
        AlignkitError: If the source is missing, has only pickle weights (or pickle weights that torch's
            weights-only loader refuses), a bad `config.json` or safetensors file, weights that do not
            match `config.json`, or is not a causal LM.
    """
    model = _from_pretrained(AutoModelForCausalLM, cfg, "a causal language model", {})
    _fit_to_tokenizer(model, tokenizer, cfg.name_or_path)
    return _maybe_lora(model, cfg, task_type="CAUSAL_LM")


def load_sequence_classifier(
    cfg: ModelConfig, num_labels: int = 1, tokenizer: PreTrainedTokenizerBase | None = None
) -> torch.nn.Module:
    """Load a model with a sequence-classification head (a reward model when `num_labels=1`).

    A causal LM checkpoint gets a newly initialised head. The model scores the last non-pad token,
    which is why `config.pad_token_id` is set from the tokenizer.

    Args:
        cfg: Model options, as for `load_causal_lm`.
        num_labels: Outputs of the head (1: scalar reward).
        tokenizer: The tokenizer from `load_tokenizer` (see `load_causal_lm`).

    Returns:
        A `PreTrainedModel`, or a `peft.PeftModel` (head fully trained) when `cfg.lora_r > 0`.

    Raises:
        AlignkitError: If the source is missing or broken (as for `load_causal_lm`), or has no
            classifier class.
    """
    extra = {"num_labels": num_labels}
    model = _from_pretrained(AutoModelForSequenceClassification, cfg, "a sequence classifier", extra)
    _fit_to_tokenizer(model, tokenizer, cfg.name_or_path)
    return _maybe_lora(model, cfg, task_type="SEQ_CLS")


def _from_pretrained(auto_cls: Any, cfg: ModelConfig, what: str, extra: dict[str, Any]) -> PreTrainedModel:
    option = "--model.name_or_path"
    source = _resolve_source(cfg.name_or_path, option, cfg.allow_unsafe_pickle)
    local = Path(source) if Path(source).is_dir() else None
    if local is not None:
        check_safetensors_files(local)
    try:
        with _quiet_load_report():
            model, info = auto_cls.from_pretrained(
                source,
                revision=cfg.revision,
                dtype=_DTYPES[cfg.dtype],
                trust_remote_code=cfg.trust_remote_code,
                # None: prefer safetensors, fall back to pickle files (only when the user allowed them).
                use_safetensors=None if cfg.allow_unsafe_pickle else True,
                weights_only=True,  # pickle files, when allowed, hold tensors only: never arbitrary objects
                # Mismatched shapes are reported by `_check_loading_info` (one line) instead of a RuntimeError.
                ignore_mismatched_sizes=True,
                output_loading_info=True,
                **extra,
            )
    except pickle.UnpicklingError as err:
        raise AlignkitError(refused_pickle_message(source, local, err)) from err
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, StrictDataclassError) as err:
        raise AlignkitError(f"cannot load {what} from `{option}` {source}: {_explain(err, cfg)}") from err
    _check_loading_info(model, info, source)
    return model


class _DropLoadReport(logging.Filter):
    """Drops transformers' multi-line LOAD REPORT table; `_check_loading_info` says what matters in one line.

    A report with CONVERSION entries is kept: the error that follows it refers to them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return "LOAD REPORT" not in message or "CONVERSION" in message


@contextlib.contextmanager
def _quiet_load_report() -> Iterator[None]:
    logger = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _check_loading_info(model: PreTrainedModel, info: dict[str, Any], source: str) -> None:
    """Refuse weights that do not match the model `config.json` describes; note unused weights.

    Parameters outside the backbone (`model.base_model_prefix`) are the task head: a sequence
    classifier's missing head is newly initialised (a reward model starts from a causal LM), and a
    head of another task in the files (`lm_head`, `score`) is not used. Anything else missing or of
    another shape would leave part of the model random, so it is an error.
    """
    config = f"{source}/config.json" if Path(source).is_dir() else f"the config of {source}"
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda row: row[0])
    if mismatched:
        key, in_file, in_model = mismatched[0]
        raise AlignkitError(
            f"{config} does not match the weights in {source}: {len(mismatched)} tensor(s) have other shapes, "
            f"e.g. `{key}` is {list(in_file)} in the weights but {list(in_model)} from the config "
            "(was hidden_size, intermediate_size, vocab_size or a head count edited?)"
        )
    backbone = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    is_classifier = "ForSequenceClassification" in type(model).__name__

    def in_head(key: str) -> bool:
        return bool(backbone) and not key.startswith(backbone)

    missing = sorted(k for k in info.get("missing_keys") or () if not (is_classifier and in_head(k)))
    if missing:
        raise AlignkitError(
            f"{config} describes {len(missing)} weight(s) that are not in the weights of {source}, e.g. "
            f"`{missing[0]}` (they would be random): was num_hidden_layers or another size edited?"
        )
    unused = sorted(k for k in info.get("unexpected_keys") or () if not in_head(k))
    if unused:
        main_print(f"note: {source}: {len(unused)} weight(s) in the files are not used by the model {config} "
                   f"describes, e.g. `{unused[0]}`")


def _explain_tokenizer(err: Exception, source: str, cfg: ModelConfig) -> str:
    """Name the bad or missing file of a local tokenizer directory, else shorten the library's message."""
    path = Path(source)
    if path.is_dir():
        for name in _JSON_FILES:
            if (path / name).is_file():
                try:
                    read_json_object(path / name)
                except AlignkitError as bad:
                    return str(bad)
        if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
            held = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            return (f"no tokenizer files in {path} (expected tokenizer.json, or tokenizer.model, vocab.json + "
                    f"merges.txt, vocab.txt); it holds {held}. Give the tokenizer's directory with --model.tokenizer")
    return _explain(err, cfg)


def _explain(err: Exception, cfg: ModelConfig) -> str:
    """The library's message, shortened to one line, with the alignkit option that addresses it."""
    message = str(err)
    if "\n" in message and "Unrecognized configuration class" not in message:
        message = re.sub(r"\s*\n\s*", " ", message).strip()
    message = message.replace("\x1b[1m", "").replace("\x1b[0m", "")
    if isinstance(err, KeyError):
        message = f"missing key {message} in its files"
    if isinstance(err, StrictDataclassError):
        message = f"config.json: {message}"
    if "Unrecognized configuration class" in message:
        # The first line names the config class; the rest lists every supported class.
        return message.splitlines()[0].replace("for this kind of AutoModel", "for")
    if "trust_remote_code" in message:
        return f"{message} (set --model.trust_remote_code true only if you trust the repository's code)"
    if "safetensors" in message and not cfg.allow_unsafe_pickle:
        return f"{message} (only safetensors weights are read unless {UNSAFE_OPTION} is set)"
    return message


def _fit_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, source: str) -> None:
    """Resize embeddings to the tokenizer (if it is larger, with a note) and record its special-token ids."""
    if tokenizer is None:
        return
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        why = (f" (the tokenizer's pad token {PAD_TOKEN} was added)"
               if len(tokenizer) == rows + 1 and tokenizer.pad_token == PAD_TOKEN else "")
        main_print(f"note: the model {source} has {rows} token embeddings but its tokenizer has {len(tokenizer)} "
                   f"tokens{why}: resizing the embeddings to {len(tokenizer)} (the new rows start untrained)")
        model.resize_token_embeddings(len(tokenizer))
    record_special_token_ids(model, tokenizer)


def record_special_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Copy the tokenizer's pad/EOS/BOS ids (those it has) into the model config and generation config."""
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, key)
        if value is None:
            continue
        setattr(model.config, key, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, key, value)


def lora_target_modules(names: list[str]) -> list[str] | str:
    """Translate `--model.lora_target_modules` to peft's form (`["all-linear"]` -> `"all-linear"`)."""
    if not names or ("all-linear" in names and len(names) > 1):
        raise AlignkitError(
            f"option `--model.lora_target_modules` is {names}: give module names, or `all-linear` alone"
        )
    return "all-linear" if names == ["all-linear"] else list(names)


def _maybe_lora(model: PreTrainedModel, cfg: ModelConfig, task_type: str) -> torch.nn.Module:
    if cfg.lora_r <= 0:
        return model
    from peft import LoraConfig, get_peft_model  # imported here: only LoRA runs need peft

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_modules(cfg.lora_target_modules),
        task_type=task_type,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise AlignkitError(f"option `--model.lora_target_modules` {cfg.lora_target_modules}: {err}") from err


def remote_code_plan(models: dict[str, tuple[str, bool]]) -> str:
    """The run plan's line on remote code: which models (label -> (path, trusted)) may run their own code."""
    trusted = [f"{label} ({path})" for label, (path, trust) in models.items() if path and trust]
    return ("may run: " + ", ".join(trusted)) if trusted else "none (no model runs its repository's code)"
