"""Rewards as code: reward functions named by a spec (or passed from Python), called in batches.

A reward function scores a batch of completions:

    fn(prompts, completions, **columns) -> list[float | None]     one value per completion

`prompts` holds one prompt per completion (a string or a chat message list), `completions` the
generated texts, and `columns` every other column of the prompt records, each as a list aligned
with the completions (e.g. `answer=[...]`; a function takes `**kwargs` for those it does not use).
A function whose signature names `completion_ids` also gets the token ids of each completion. None
means "not applicable to this completion". An `async def` function is awaited (with the timeout).

Specs (CLI / YAML; `load_function`):

    answer_match                          a built-in (`alignkit.rewards.builtins.BUILTINS`)
    format_match(pattern="^A: [0-9]+$")   a built-in with settings (keyword arguments, Python literals)
    my_package.rewards:brevity            `module:function`, imported when named
    path/to/rewards.py:brevity(k=2)       `file.py:function`: the user's own code, run when named

Calls (`FunctionRunner`): in this process by default; with `workers` > 0 in a pool of spawned
processes, the batch split into one chunk per worker, each call under `timeout_s`. A function that
raises, times out or returns a wrong shape or a non-finite value fails the step with its name and the
prompt index (its rows are retried one at a time to find the row that raises), or, with
`error_value` set, those rows score that value and are counted: never a silent 0.

This module imports only the standard library: it is imported again in every worker process.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import math
import multiprocessing
import numbers
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError
from alignkit.rewards import builtins

_RESERVED = frozenset({"prompts", "completions", "completion_ids"})  # arguments, not columns
_SPEC = re.compile(r"^\s*(?P<target>[^()\s][^()]*?)\s*(?:\((?P<args>.*)\))?\s*$", re.DOTALL)


@dataclass
class RewardFunction:
    """A loaded reward function: its log name, the callable (settings bound), where it comes from."""

    name: str
    """Name in logs and summaries (`reward/<name>`): the built-in's or the function's name."""
    fn: Callable[..., Any]
    spec: str | None = None
    """The spec it was loaded from (None when passed as a callable); workers load it again from this."""
    source: str = ""
    """Where its code comes from, for the plan printed before step 0."""

    @property
    def wants_ids(self) -> bool:
        """Whether the function names a `completion_ids` parameter (then it gets the token ids)."""
        return "completion_ids" in _parameters(self.fn)

    @property
    def settings(self) -> set[str]:
        """Its settings: keyword-only parameters (by convention) and those bound in the spec."""
        base = self.fn.func if isinstance(self.fn, functools.partial) else self.fn
        try:
            params = inspect.signature(base).parameters.values()
        except (TypeError, ValueError):
            params = []
        bound = set(self.fn.keywords) if isinstance(self.fn, functools.partial) else set()
        return bound | {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @property
    def is_async(self) -> bool:
        fn = self.fn.func if isinstance(self.fn, functools.partial) else self.fn
        method = None if inspect.isroutine(fn) else type(fn).__dict__.get("__call__")  # a callable object
        return inspect.iscoroutinefunction(fn) or (method is not None and inspect.iscoroutinefunction(method))


def _parameters(fn: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return set()


_WORDS = {"true": True, "false": False, "none": None, "null": None}


def _setting(node: ast.expr) -> Any:
    """A setting's value: a Python literal, or a bare word (`full` -> "full"; true/false/none/null any case)."""
    if isinstance(node, ast.Name):
        return _WORDS.get(node.id.lower(), node.id)
    return ast.literal_eval(node)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """(`target`, settings) of a spec `target` or `target(key=value, ...)`.

    Values are Python literals (`3`, `0.5`, `"^A"`, `[1, 2]`) or bare words: `extract=full` is the
    string "full", and true / false / none / null (any case) are True / False / None, so a spec reads
    the same on the command line, in YAML and in Python.
    """
    match = _SPEC.match(spec)
    if not match:
        raise AlignkitError(f"reward function spec {spec!r}: expected NAME, module:function or file.py:function, "
                            "optionally followed by (key=value, ...)")
    target, args = match.group("target"), match.group("args")
    if args is None or not args.strip():
        return target, {}
    try:
        call = ast.parse(f"f({args})", mode="eval").body
        assert isinstance(call, ast.Call)
        if call.args:
            raise AlignkitError(f"reward function spec {spec!r}: settings are key=value pairs, not positional values")
        settings = {kw.arg: _setting(kw.value) for kw in call.keywords if kw.arg}
    except (SyntaxError, ValueError) as err:
        raise AlignkitError(f"reward function spec {spec!r}: cannot read the settings ({err}); use key=value "
                            "with Python literals or bare words, e.g. format_match(pattern=\"^A\")") from None
    return target, settings


def load_function(spec: str) -> RewardFunction:
    """Load the reward function named by `spec` (see the module docstring), settings bound.

    Raises:
        AlignkitError: An unknown built-in, a missing module, file or function, code that fails to
            import (its error shown), or a name that is not callable.
    """
    target, settings = parse_spec(spec)
    if ":" not in target:
        builtins.check_builtin(target, settings)
        fn: Callable[..., Any] = builtins.BUILTINS[target]
        name, source = target, "built-in"
    else:
        where, _, attr = target.rpartition(":")
        module, source = _import_target(where, spec)
        fn = getattr(module, attr, None)
        if fn is None or not callable(fn):
            found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            hint = difflib.get_close_matches(attr, found, n=1)
            raise AlignkitError(f"reward function spec {spec!r}: {where} has no function `{attr}`"
                                + (f"; did you mean `{hint[0]}`?" if hint else f" (it defines {found[:8]})"))
        name = attr
    if settings:
        _check_settings(fn, settings, spec)
        fn = functools.partial(fn, **settings)
    return RewardFunction(name=name, fn=fn, spec=spec, source=source)


def _check_settings(fn: Callable[..., Any], settings: dict[str, Any], spec: str) -> None:
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in settings if k not in params and not takes_any]
    if unknown:
        raise AlignkitError(f"reward function spec {spec!r}: the function takes no setting `{unknown[0]}` "
                            f"(its parameters: {list(params)})")


def _import_target(where: str, spec: str) -> tuple[Any, str]:
    """The module of `file.py` or `package.module` in a spec, and a description of its source."""
    path = Path(where).expanduser()
    if where.endswith(".py") or path.is_file():
        if not path.is_file():
            raise AlignkitError(f"reward function spec {spec!r}: no file {path}")
        path = path.resolve()
        name = f"alignkit_user_rewards_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
        if name in sys.modules:
            return sys.modules[name], f"user code from {path}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:  # the user's code failed to import: say where, without our traceback
            raise AlignkitError(f"reward function spec {spec!r}: importing {path} failed: "
                                f"{type(err).__name__}: {err}") from None
        sys.modules[name] = module
        return module, f"user code from {path}"
    try:
        module = importlib.import_module(where)
    except ModuleNotFoundError as err:
        raise AlignkitError(f"reward function spec {spec!r}: cannot import module `{where}` ({err}); give "
                            "module:function of an importable module, or path/to/file.py:function") from None
    except Exception as err:
        raise AlignkitError(f"reward function spec {spec!r}: importing module `{where}` failed: "
                            f"{type(err).__name__}: {err}") from None
    return module, f"user code from module {where} ({getattr(module, '__file__', '?')})"


def from_callable(fn: Callable[..., Any], name: str | None = None) -> RewardFunction:
    """A Python callable as a reward function (named after it unless `name` is given)."""
    if not callable(fn):
        raise AlignkitError(f"reward function {fn!r} is not callable")
    base = fn.func if isinstance(fn, functools.partial) else fn
    label = name or getattr(base, "__name__", None) or type(base).__name__
    return RewardFunction(name=label, fn=fn, spec=None, source=f"Python callable {label}")


def unique_names(names: Sequence[str]) -> list[str]:
    """`names` with repeats numbered (`f`, `f_2`, ...), so each component logs under its own key."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


# ---------------------------------------------------------------------------------------------
# Calling
# ---------------------------------------------------------------------------------------------


class CallFailed(Exception):
    """A reward function call that raised or timed out (message ready for the user)."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


_WORKER_CACHE: dict[str, RewardFunction] = {}


def _worker_call(payload: str | Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """Runs in a worker process: load the function (once per spec) and call it."""
    if isinstance(payload, str):
        if payload not in _WORKER_CACHE:
            _WORKER_CACHE[payload] = load_function(payload)
        payload = _WORKER_CACHE[payload].fn
    result = payload(*args, **kwargs)
    return list(result) if not isinstance(result, list) else result


class FunctionRunner:
    """Calls reward functions on batches: in-process, or in a pool of `workers` spawned processes.

    Args:
        workers: Worker processes (0: call in this process).
        timeout_s: Seconds one call may take (0: no limit). A sync function in this process cannot be
            interrupted, so a limit needs `workers` >= 1 (async functions are cancelled in-process).
        error_value: Score of the rows whose call raised or timed out (None: fail the step).
    """

    def __init__(self, workers: int = 0, timeout_s: float = 0.0, error_value: float | None = None) -> None:
        if workers < 0 or timeout_s < 0:
            raise AlignkitError("reward function options: `workers` and `timeout_s` must be >= 0")
        self.workers, self.timeout_s, self.error_value = workers, timeout_s, error_value
        self._pool: Any = None

    def check(self, functions: Sequence[RewardFunction]) -> None:
        """Refuse a timeout on a sync function that would run in this process (it cannot be stopped)."""
        sync = [f.name for f in functions if not f.is_async]
        if self.timeout_s and not self.workers and sync:
            raise AlignkitError(f"option `reward.timeout_s` ({self.timeout_s:g}) needs `reward.workers` >= 1 for "
                                f"the sync reward function(s) {sync}: a Python call running in this process "
                                "cannot be interrupted")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def _get_pool(self) -> Any:
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
        return self._pool

    def call(self, rf: RewardFunction, prompts: list[Any], completions: list[str], columns: dict[str, list[Any]],
             completion_ids: list[list[int]] | None, indices: Sequence[int]) -> tuple[list[float | None], int]:
        """One value per completion (None: not applicable) and the count of rows scored `error_value`.

        `indices`: each row's prompt index, named in errors.
        """
        n = len(completions)
        kwargs_of = functools.partial(self._kwargs, rf, prompts, completions, columns, completion_ids)
        chunks = self._chunks(n) if self.workers and not rf.is_async else [range(n)]
        results = self._run(rf, [kwargs_of(rows) for rows in chunks])
        values: list[float | None] = [None] * n
        errors = 0
        for rows, result in zip(chunks, results, strict=True):
            if isinstance(result, CallFailed):
                got, failed = self._locate(rf, rows, kwargs_of, result, indices)
                errors += failed
            else:
                got = _check_values(rf.name, result, rows, indices)
            for row, value in zip(rows, got, strict=True):
                values[row] = value
        return values, errors

    def _chunks(self, n: int) -> list[range]:
        size = max(1, math.ceil(n / self.workers))
        return [range(i, min(i + size, n)) for i in range(0, n, size)]

    @staticmethod
    def _kwargs(rf: RewardFunction, prompts: list[Any], completions: list[str], columns: dict[str, list[Any]],
                completion_ids: list[list[int]] | None, rows: range) -> dict[str, Any]:
        clash = sorted(set(columns) & (_RESERVED | rf.settings))
        if clash:
            raise AlignkitError(f"reward function `{rf.name}`: the prompt records have a column `{clash[0]}`, which "
                                "is also the name of one of its arguments or settings; rename the column")
        kwargs = {name: [values[i] for i in rows] for name, values in columns.items()}
        kwargs["prompts"] = [prompts[i] for i in rows]
        kwargs["completions"] = [completions[i] for i in rows]
        if rf.wants_ids:
            if completion_ids is None:
                raise AlignkitError(f"reward function `{rf.name}` asks for `completion_ids`, which this stage "
                                    "does not have (it scores text only)")
            kwargs["completion_ids"] = [completion_ids[i] for i in rows]
        return kwargs

    def _run(self, rf: RewardFunction, calls: list[dict[str, Any]]) -> list[Any]:
        """Each call's result, or a `CallFailed` for one that raised or timed out."""
        if rf.is_async:
            return [self._run_async(rf, kw) for kw in calls]
        if not self.workers:
            out = []
            for kw in calls:
                try:
                    out.append(rf.fn(**kw))
                except Exception as err:
                    out.append(CallFailed(f"{type(err).__name__}: {err}"))
            return out
        pool = self._get_pool()
        payload = rf.spec if rf.spec is not None else rf.fn
        pending = [pool.apply_async(_worker_call, (payload, (), kw)) for kw in calls]
        out = []
        for job in pending:
            try:
                out.append(job.get(self.timeout_s or None))
            except multiprocessing.TimeoutError:
                out.append(CallFailed(f"no result within reward.timeout_s = {self.timeout_s:g} s", timed_out=True))
            except Exception as err:
                out.append(CallFailed(f"{type(err).__name__}: {err}"))
        if any(isinstance(r, CallFailed) and r.timed_out for r in out):
            self.close()  # a hung worker cannot be stopped otherwise; the next call starts a fresh pool
        return out

    def _run_async(self, rf: RewardFunction, kwargs: dict[str, Any]) -> Any:
        async def bounded() -> Any:
            return await asyncio.wait_for(rf.fn(**kwargs), self.timeout_s or None)

        try:
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # no loop running in this thread: the usual case
                return asyncio.run(bounded())
            with concurrent.futures.ThreadPoolExecutor(1) as ex:  # called from inside a running loop (a notebook)
                return ex.submit(asyncio.run, bounded()).result()
        except TimeoutError:
            return CallFailed(f"no result within reward.timeout_s = {self.timeout_s:g} s", timed_out=True)
        except Exception as err:
            return CallFailed(f"{type(err).__name__}: {err}")

    def _locate(self, rf: RewardFunction, rows: range, kwargs_of: Callable[[range], dict[str, Any]],
                failure: CallFailed, indices: Sequence[int]) -> tuple[list[float | None], int]:
        """A failed call's rows: retried one at a time (a raise) to find the failing row; `error_value` or fail."""
        if failure.timed_out or len(rows) == 1:
            if self.error_value is None:
                raise AlignkitError(_failure_message(rf.name, failure, rows, indices))
            return [self.error_value] * len(rows), len(rows)
        singles = [range(row, row + 1) for row in rows]
        results = self._run(rf, [kwargs_of(r) for r in singles])
        values: list[float | None] = []
        failed = 0
        for single, result in zip(singles, results, strict=True):
            if isinstance(result, CallFailed):
                if self.error_value is None:
                    raise AlignkitError(_failure_message(rf.name, result, single, indices))
                values.append(self.error_value)
                failed += 1
            else:
                values += _check_values(rf.name, result, single, indices)
        if not failed and self.error_value is None:  # raised on the batch, not on any row alone
            raise AlignkitError(_failure_message(rf.name, failure, rows, indices))
        return values, failed


def _failure_message(name: str, failure: CallFailed, rows: range, indices: Sequence[int]) -> str:
    where = (f"prompt index {indices[rows[0]]}" if len(rows) == 1
             else f"a call on prompt indices {indices[rows[0]]}..{indices[rows[-1]]}")
    what = "timed out" if failure.timed_out else "raised"
    return (f"reward function `{name}` {what} on {where}: {failure}; fix the function, or set "
            "`reward.error_value` to score such rows with a fixed value")


def _check_values(name: str, result: Any, rows: range, indices: Sequence[int]) -> list[float | None]:
    """The values a call returned, checked: one per row, each a finite real number or None."""
    if hasattr(result, "tolist"):  # a tensor or an array
        result = result.tolist()
    if isinstance(result, str | bytes) or not isinstance(result, Sequence):
        raise AlignkitError(f"reward function `{name}` returned {type(result).__name__}; expected a list of "
                            f"{len(rows)} floats (one per completion, None where it does not apply)")
    if len(result) != len(rows):
        raise AlignkitError(f"reward function `{name}` returned {len(result)} values for {len(rows)} completions "
                            f"(prompt indices {indices[rows[0]]}..{indices[rows[-1]]})")
    out: list[float | None] = []
    for row, value in zip(rows, result, strict=True):
        if value is not None and not (isinstance(value, numbers.Real) and math.isfinite(value)):
            raise AlignkitError(f"reward function `{name}` returned {value!r} on prompt index {indices[row]}: "
                                "expected a finite number or None")
        out.append(None if value is None else float(value))
    return out
