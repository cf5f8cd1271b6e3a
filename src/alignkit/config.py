"""Stage configs: dataclasses whose every field is settable from YAML and from the command line.

A stage's config is a dataclass with shallow parts (`run`, `model`, `data`, `optim`) plus its own
fields. The string literal under a field is its documentation and becomes its `--help` text.
`resolve_config(cls, yaml_path, argv)` reads the YAML file, applies `--a.b VALUE` overrides (the
command line wins), checks every key and value, and returns the dataclass.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from alignkit.errors import AlignkitError


@dataclass
class RunConfig:
    """Where a stage writes, how it logs, checkpoints and resumes."""

    LIMITS: ClassVar[dict[str, str]] = {"seed": ">= 0", "save_every": ">= 0", "keep_last": ">= 1",
                                        "log_every": ">= 1", "eval_every": ">= 0"}

    output_dir: str | None = None
    """Run directory; default `runs/<stage>-<timestamp>`."""
    seed: int = 0
    """Seed of every random number generator (data order, sampling, initialisation)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in `output_dir` (exactly, data position included).
    A config that differs from the saved `config.yaml` is refused, naming the fields, unless they are
    listed in `run.resume_override`; output, logging, checkpoint-interval and `accel` fields may change."""
    resume_override: list[str] = field(default_factory=list)
    """Fields allowed to differ from the saved config on `--run.resume`, e.g. `optim.lr,optim.max_steps`:
    the new values apply (a new `optim.lr` rescales the restored schedule) and the change is recorded in
    `resume_history.jsonl`."""
    save_every: int = 0
    """Write a checkpoint every N optimizer steps (0: only the final model)."""
    keep_last: int = 2
    """How many of the newest checkpoints to keep."""
    log_every: int = 10
    """Log metrics every N optimizer steps."""
    eval_every: int = 0
    """Evaluate on held-out data every N optimizer steps (0: only at the end)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """On a NaN/inf loss or gradient: stop with the step named, or skip that step's update."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab",
                            "trackio"]] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers (accelerate's) that also get the metrics, e.g. `tensorboard,wandb`; `[]`: none.
    Each needs its package (`pip install wandb`); TensorBoard (events in `<output_dir>/alignkit/`) is
    skipped with a note when `tensorboard` is not installed. `metrics.jsonl` is always written."""
    progress: bool = True
    """Show a progress bar with ETA."""
    accel: Literal["auto", "cpu", "plain"] = "auto"
    """Acceleration backend (`alignkit.accel`): `plain` = Hugging Face forward and KV-cache decoding, any
    model and device; `cpu` = alignkit's CPU machinery (lean decoder, prompt-shared rows, oneDNN weights,
    one-token reward read), each falling back to `plain` where a model is not covered; `auto` = `cpu` on
    a CPU, `plain` on an accelerator. Same results to float rounding; the run plan says what was picked.
    The `ALIGNKIT_ACCEL` environment variable overrides it."""


@dataclass
class ModelConfig:
    """Which model to load and how."""

    LIMITS: ClassVar[dict[str, str]] = {"lora_r": ">= 0", "lora_alpha": "> 0", "lora_dropout": "[0, 1)"}

    name_or_path: str = ""
    """Hugging Face hub id or local directory of the model."""
    tokenizer: str | None = None
    """Tokenizer id or path; default: the model's."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code. Only for repositories you trust."""
    allow_unsafe_pickle: bool = False
    """Allow loading pickle weight files (`*.bin`, `*.pt`); unpickling can run arbitrary code."""
    lora_r: int = 0
    """LoRA rank; 0 trains all parameters."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names that get adapters (`all-linear`: every linear layer but the output head)."""
    save_merged: bool = True
    """Save LoRA models with the adapters merged into the base weights."""


@dataclass
class DataConfig:
    """Where the training and held-out records come from."""

    LIMITS: ClassVar[dict[str, str]] = {"eval_fraction": "[0, 1)", "max_length": ">= 2", "limit": ">= 1"}

    path: str = ""
    """JSONL, JSON, CSV or Parquet file, a local `datasets` directory, or a hub id `name[:split]`."""
    eval_path: str | None = None
    """Held-out records; default: `eval_fraction` of `path`."""
    eval_fraction: float = 0.02
    """Fraction of `path` held out for evaluation when `eval_path` is not given."""
    max_length: int = 512
    """Maximum tokens per example (prompt + response)."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """Stop at the first invalid row (naming file, row and field), or skip and count them."""
    limit: int | None = None
    """Use only the first N records."""


@dataclass
class OptimConfig:
    """Optimizer, schedule and batch sizes."""

    LIMITS: ClassVar[dict[str, str]] = {
        "lr": "> 0", "weight_decay": ">= 0", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "adam_eps": "> 0",
        "warmup_steps": ">= 0", "max_grad_norm": ">= 0", "per_device_batch_size": ">= 1", "grad_accum_steps": ">= 1",
        "epochs": ">= 0", "max_steps": ">= 0"}

    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    per_device_batch_size: int = 8
    """Examples per forward pass on each device."""
    grad_accum_steps: int = 1
    """Forward passes accumulated per optimizer step (global batch = per device x accum x devices)."""
    epochs: float = 1.0
    """Passes over the training data (ignored when `max_steps` > 0)."""
    max_steps: int = 0
    """Optimizer steps to run (0: derive from `epochs`)."""

    def check(self) -> str | None:
        """What is wrong across fields (`check_options` names the part), or None."""
        if self.max_steps == 0 and self.epochs == 0:
            return "`max_steps` and `epochs` are both 0: nothing would be trained; set one of them > 0"
        return None


# ---------------------------------------------------------------------------------------------
# Field documentation and types
# ---------------------------------------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its documentation), from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@dataclass
class SamplingConfig:
    """How responses are sampled from a policy (every stage that samples has this part, `sampling.*`)."""

    LIMITS: ClassVar[dict[str, str]] = {"max_new_tokens": ">= 1", "min_new_tokens": ">= 0", "temperature": "> 0",
                                        "top_k": ">= 0", "top_p": "(0, 1]"}

    max_new_tokens: int = 24
    """Maximum response length in tokens."""
    min_new_tokens: int = 0
    """EOS is masked before this many tokens."""
    temperature: float = 1.0
    """Softmax temperature; log-probs of the sampled tokens are computed from logits / temperature."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: off)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens with this much probability (1: off)."""

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `alignkit.rollout.generate.sample`."""
        return dataclasses.asdict(self)

    def check(self) -> str | None:
        """What is wrong across fields, or None."""
        if self.min_new_tokens > self.max_new_tokens:
            return f"`min_new_tokens` ({self.min_new_tokens}) exceeds `max_new_tokens` ({self.max_new_tokens})"
        return None


def _field_types(cls: type) -> dict[str, Any]:
    """The type of each dataclass field (class variables such as `LIMITS` are not options)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------------------------------------
# Value limits: `LIMITS = {"field": ">= 1" | "> 0" | "[0, 1)" | ...}` on a config class (a subclass's
# `LIMITS` add to those of the classes it extends; `limits_of`)
# ---------------------------------------------------------------------------------------------

_BOUND = re.compile(r"^(>=|>|<=|<)\s*(-?[\d.e+-]+)$")
_INTERVAL = re.compile(r"^([\[(])\s*(-?[\d.e+-]+)\s*,\s*(-?[\d.e+-]+)\s*([\])])$")


def _within(value: float, limit: str) -> bool:
    """Whether `value` satisfies a limit written as `>= a`, `> a`, `< a`, `<= a` or an interval `[a, b)`."""
    if match := _BOUND.match(limit):
        op, bound = match[1], float(match[2])
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
    match = _INTERVAL.match(limit)
    if match is None:
        raise ValueError(f"bad limit {limit!r}")
    low, high = float(match[2]), float(match[3])
    above = value >= low if match[1] == "[" else value > low
    below = value <= high if match[4] == "]" else value < high
    return above and below


def limits_of(cls: type) -> dict[str, str]:
    """The `LIMITS` of a config class and of the classes it extends (a subclass adds or overrides limits)."""
    limits: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        limits.update(vars(klass).get("LIMITS", {}))
    return limits


def check_options(cfg: Any, prefix: str = "") -> None:
    """Check every value of a config against its class's `LIMITS` and cross-field `check()`.

    Numbers must be finite (no NaN or infinity in any option) and within their limits; None (an
    unset optional option) passes. Called when a config is resolved (CLI, YAML, pipeline), before
    any model loads.

    Raises:
        AlignkitError: Naming the dotted option, the limit and the value given.
    """
    limits = limits_of(type(cfg))
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_options(value, f"{key}.")
            continue
        numbers = value if isinstance(value, list) else [value]
        for number in numbers:
            if isinstance(number, bool) or not isinstance(number, int | float):
                continue
            if not math.isfinite(number):
                raise AlignkitError(f"option `{key}`: expected a finite number, got {number}")
            if f.name in limits and not _within(number, limits[f.name]):
                raise AlignkitError(f"option `{key}`: expected a value {limits[f.name]}, got {number}")
    problem = cfg.check() if hasattr(cfg, "check") else None
    if problem:
        part = prefix.rstrip(".")
        raise AlignkitError(f"options{' of `' + part + '`' if part else ''}: {problem}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


# ---------------------------------------------------------------------------------------------
# Coercion of YAML / command-line values
# ---------------------------------------------------------------------------------------------

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """`text` split at each `sep` outside brackets and quotes: `a(x=1,y=2),b` -> [`a(x=1,y=2)`, `b`]."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _coerce(value: Any, tp: Any, key: str) -> Any:  # noqa: C901 - one branch per supported type
    """Convert `value` (from YAML or a command-line string) to type `tp`, or raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in {"none", "null"}):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except AlignkitError as err:
                errors.append(str(err))
        raise AlignkitError(f"option `{key}`: cannot read {value!r} as {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or str(value) == str(choice):
                return choice
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise AlignkitError(f"option `{key}`: {value!r} is not one of {list(choices)}{extra}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and value.strip().startswith("["):  # YAML flow style: [500, 1000] or []
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise AlignkitError(f"option `{key}`: cannot read {value!r} as a list") from None
        if isinstance(value, str):
            value = [v for v in split_top_level(value) if v.strip()] if value.strip() else []
        if not isinstance(value, list | tuple):
            raise AlignkitError(f"option `{key}`: expected a list, got {value!r}")
        return [_coerce(v, item_tp, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise AlignkitError(f"option `{key}`: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise AlignkitError(f"option `{key}`: expected {tp.__name__}, got {value!r}")
        try:
            number = tp(value) if tp is float or not isinstance(value, str) else int(value, 0)
        except (TypeError, ValueError):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = None
            if tp is int and number is not None and number.is_integer():
                return int(number)
            raise AlignkitError(f"option `{key}`: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise AlignkitError(f"option `{key}`: expected int, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, dict | list):
            raise AlignkitError(f"option `{key}`: expected a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise AlignkitError(f"option `{key}`: unsupported type {tp!r}")


# ---------------------------------------------------------------------------------------------
# Building a config from nested dicts
# ---------------------------------------------------------------------------------------------


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of a config class, e.g. `optim.lr`."""
    keys = []
    for name, tp in _field_types(cls).items():
        if _is_dataclass_type(tp):
            keys.extend(all_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key(key: str, cls: type, prefix: str, where: str) -> AlignkitError:
    candidates = all_keys(cls, prefix)
    hints = difflib.get_close_matches(prefix + key, candidates, n=3, cutoff=0.6)
    hints += [c for c in candidates if c.rsplit(".", 1)[-1] == key and c not in hints]
    extra = f"; did you mean {', '.join(repr(h) for h in hints[:3])}?" if hints else ""
    return AlignkitError(f"unknown option `{prefix}{key}` in {where}{extra}")


def build(cls: type, values: dict[str, Any], where: str = "config", prefix: str = "", base: Any = None) -> Any:
    """Instantiate dataclass `cls` from a nested dict, checking keys and coercing values.

    Unset fields keep their defaults from `base` (default: `cls()`), so a stage's own defaults for a
    part (e.g. `OptimConfig(lr=1e-3)` in its `optim` field) survive when only some keys are given.
    """
    if not isinstance(values, dict):
        raise AlignkitError(f"{where}: `{prefix.rstrip('.') or 'config'}` must be a mapping")
    base = cls() if base is None else base
    hints = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key(str(key), cls, prefix, where)
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = build(tp, value or {}, where, f"{prefix}{key}.", getattr(base, key))
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    out = dataclasses.replace(base, **kwargs)
    if not prefix:  # the whole config: its values against their limits
        check_options(out)
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a nested plain dict (YAML-ready): a Python callable set in a config (a reward
    function passed from Python) becomes the string `python:<module>.<name>`."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if callable(value):
        base = getattr(value, "func", value)  # a functools.partial
        return f"python:{getattr(base, '__module__', '?')}.{getattr(base, '__qualname__', type(base).__name__)}"
    return value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _resolve_cli_key(cls: type, raw: str) -> str:
    """Map `--optim.lr` / `--output-dir` to a dotted key; bare leaf names work when unambiguous."""
    key = raw.replace("-", "_")
    keys = all_keys(cls)
    if key in keys:
        return key
    leaf_matches = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(leaf_matches) == 1:
        return leaf_matches[0]
    if len(leaf_matches) > 1:
        raise AlignkitError(f"option `--{raw}` is ambiguous: use one of {', '.join('--' + k for k in leaf_matches)}")
    # a leaf name can be the leaf of several keys, and a top-level key is its own leaf: each once
    candidates = list(dict.fromkeys(keys + [k.rsplit(".", 1)[-1] for k in keys]))
    hints = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    extra = f"; did you mean {', '.join('--' + h for h in hints)}?" if hints else ""
    raise AlignkitError(f"unknown option `--{raw}`{extra} (see --help)")


def _leaf_type(cls: type, dotted: str) -> Any:
    tp: Any = cls
    for part in dotted.split("."):
        tp = _field_types(tp)[part]
    return tp


def parse_overrides(cls: type, argv: list[str]) -> dict[str, Any]:
    """Parse `--key VALUE`, `--key=VALUE` and bare boolean `--flag` into a nested override dict."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise AlignkitError(f"unexpected argument {arg!r}; options look like --name VALUE")
        raw, eq, value = arg[2:].partition("=")
        key = _resolve_cli_key(cls, raw)
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if _leaf_type(cls, key) is bool and (nxt is None or nxt.startswith("--")):
                value = "true"
            elif nxt is None:
                raise AlignkitError(f"option `--{raw}` needs a value")
            else:
                value = nxt
                i += 1
        _set_dotted(overrides, key, value)
        i += 1
    return overrides


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: where (line, column of the file) and what, without the parser's snippet."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or not problem:
        return " ".join(str(err).split())
    context = getattr(err, "context", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (f" ({context})" if context else "")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise AlignkitError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise AlignkitError(f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                            f"{err.start}); expected YAML") from None
    except yaml.YAMLError as err:
        raise AlignkitError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise AlignkitError(f"config file {path} must hold a mapping of options")
    return data


def resolve_config(cls: type, config_path: str | Path | None = None, argv: list[str] | None = None) -> Any:
    """YAML file (optional) + command-line overrides (win) -> validated config dataclass."""
    values: dict[str, Any] = read_yaml(config_path) if config_path else {}
    where = str(config_path) if config_path else "config"
    build(cls, values, where)  # report YAML errors against the file first
    if argv:
        values = _merge(values, parse_overrides(cls, argv))
    return build(cls, values, f"{where} + command line" if config_path else "command line")


def format_help(cls: type, prefix: str = "", defaults: Any = None) -> str:
    """One line per field: `--key TYPE (default: X)  doc`, grouped by part (defaults as the stage sets them)."""
    lines: list[str] = []
    docs = field_docs(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        default = getattr(defaults, f.name)
        if _is_dataclass_type(tp):
            lines.append(f"\n{prefix}{f.name}: {(tp.__doc__ or '').strip().splitlines()[0]}")
            lines.append(format_help(tp, f"{prefix}{f.name}.", default))
            continue
        limit = limits_of(cls).get(f.name)
        lines.append(f"  --{prefix}{f.name} {_type_name(tp)} (default: {default!r}{'; ' + limit if limit else ''})")
        if docs.get(f.name):
            lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)


def world_names(cfg: Any) -> list[str]:
    """The worlds a stage config names: its `world` / `gold_world` options and `gold:<world>` scorer specs."""
    names: list[str] = []

    def walk(obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value)
            elif isinstance(value, str) and value:
                name = value if f.name in ("world", "gold_world") else value[5:] if value.startswith("gold:") else ""
                if name and name not in names:
                    names.append(name)

    walk(cfg)
    return names


def require_world(cfg: Any, world: Any) -> Any:
    """The loaded world a stage was given for the world its config names (None when it names none).

    Worlds are loaded at the edge (the CLI, the pipeline, `alignkit.pipeline.run_stage`) and passed to
    a stage's `run(cfg, world=...)`; the layers below never look one up.

    Raises:
        AlignkitError: The config names two worlds, or names one that was not passed.
    """
    names = world_names(cfg)
    if not names:
        return None
    if len(names) > 1:
        raise AlignkitError(f"the options name {len(names)} worlds ({', '.join(names)}); a stage runs in one")
    if world is None or getattr(world, "name", names[0]) != names[0]:
        raise AlignkitError(f"option `world` ({names[0]!r}): this stage needs the loaded world. The CLI and the "
                            f"pipeline load it; from Python call alignkit.pipeline.run_stage(stage, cfg) or pass "
                            f"run(cfg, world=alignkit.worlds.get_world({names[0]!r}))")
    return world
