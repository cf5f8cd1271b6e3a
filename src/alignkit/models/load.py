"""Load tokenizers and Hugging Face models safely, with a distinct pad token and optional LoRA.

Every stage loads models here, so the same rules hold everywhere: the tokenizer has a pad token
distinct from EOS (embeddings are resized when one is added) and a chat template; weights are read
from safetensors only unless `--model.allow_unsafe_pickle` is set (unpickling can run arbitrary
code), and a local directory holding only pickle weights is refused before anything reads it;
`trust_remote_code` is off unless the config turns it on; a problem the user can fix raises
`AlignkitError` naming the path and the option.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alignkit.config import ModelConfig
from alignkit.errors import AlignkitError

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

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Weight-file suffixes whose loading unpickles (and so can run code)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_UNSAFE_OPTION = "--model.allow_unsafe_pickle"


def check_weight_files(path: str | Path, allow_unsafe_pickle: bool) -> None:
    """Refuse a local model directory whose only weights are pickle files.

    Looks at file names (and the `transformers_weights` entry of `config.json`) only; never opens a
    pickle file.

    Args:
        path: Local model directory.
        allow_unsafe_pickle: The value of `--model.allow_unsafe_pickle`; True skips the check.

    Raises:
        AlignkitError: If the directory holds no `*.safetensors` file but pickle weights, naming the
            file and the option that allows it.
    """
    if allow_unsafe_pickle:
        return
    path = Path(path)
    explicit = _explicit_weights_file(path)
    if explicit is not None and not explicit.endswith((".safetensors", ".safetensors.index.json")):
        raise AlignkitError(
            f"{path / 'config.json'} names the weight file {explicit!r}, which is not safetensors; "
            f"loading it could run code. Set {_UNSAFE_OPTION} true only if you trust it"
        )
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise AlignkitError(
            f"model directory {path} has no *.safetensors weights, only pickle file {pickles[0].name} "
            f"(unpickling can run arbitrary code). Convert it to safetensors, or set {_UNSAFE_OPTION} "
            "true if you trust its source"
        )


def _explicit_weights_file(path: Path) -> str | None:
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None  # transformers reports a broken config.json with its own message
    value = config.get("transformers_weights") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def _resolve_source(name_or_path: str, option: str, allow_unsafe_pickle: bool) -> str:
    """Check a model/tokenizer source: an existing local directory (checked for safe weights) or a hub id."""
    if not name_or_path:
        raise AlignkitError(f"option `{option}` is empty: give a hub id or a local model directory")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
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
    except (OSError, ValueError, KeyError) as err:
        raise AlignkitError(
            f"cannot load a tokenizer from `{option}` {source}: {_explain(err, cfg)}"
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
        AlignkitError: If the source is missing, has only pickle weights, or is not a causal LM.
    """
    model = _from_pretrained(AutoModelForCausalLM, cfg, "a causal language model", {})
    _fit_to_tokenizer(model, tokenizer)
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
        AlignkitError: If the source is missing, has only pickle weights, or has no classifier class.
    """
    extra = {"num_labels": num_labels}
    model = _from_pretrained(AutoModelForSequenceClassification, cfg, "a sequence classifier", extra)
    _fit_to_tokenizer(model, tokenizer)
    return _maybe_lora(model, cfg, task_type="SEQ_CLS")


def _from_pretrained(auto_cls: Any, cfg: ModelConfig, what: str, extra: dict[str, Any]) -> PreTrainedModel:
    option = "--model.name_or_path"
    source = _resolve_source(cfg.name_or_path, option, cfg.allow_unsafe_pickle)
    try:
        return auto_cls.from_pretrained(
            source,
            revision=cfg.revision,
            dtype=_DTYPES[cfg.dtype],
            trust_remote_code=cfg.trust_remote_code,
            # None: prefer safetensors, fall back to pickle files (only when the user allowed them).
            use_safetensors=None if cfg.allow_unsafe_pickle else True,
            **extra,
        )
    except (OSError, ValueError, KeyError) as err:
        raise AlignkitError(f"cannot load {what} from `{option}` {source}: {_explain(err, cfg)}") from err


def _explain(err: Exception, cfg: ModelConfig) -> str:
    """The library's message, shortened, with the alignkit option that addresses it."""
    message = str(err)
    if "Unrecognized configuration class" in message:
        # The first line names the config class; the rest lists every supported class.
        return message.splitlines()[0].replace("for this kind of AutoModel", "for")
    if "trust_remote_code" in message:
        return f"{message} (set --model.trust_remote_code true only if you trust the repository's code)"
    if "safetensors" in message and not cfg.allow_unsafe_pickle:
        return f"{message} (only safetensors weights are read unless {_UNSAFE_OPTION} is set)"
    return message


def _fit_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Resize embeddings to the tokenizer (if it grew) and record its special-token ids in the configs."""
    if tokenizer is None:
        return
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
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
