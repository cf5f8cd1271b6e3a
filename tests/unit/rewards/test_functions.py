"""Reward functions: specs, loading (built-ins, modules, files), batched calls, raising and hanging functions."""

from __future__ import annotations

import asyncio
import math
import sys
import textwrap
import time

import pytest

from alignkit.errors import AlignkitError
from alignkit.rewards.config import RewardFunctionsConfig
from alignkit.rewards.functions import FunctionRunner, from_callable, load_function, parse_spec, unique_names

PROMPTS = ["Q 1", "Q 2", "Q 3", "Q 4"]
DONE = ["1", "two", "3", "x"]


def test_parse_spec_reads_targets_and_literal_settings():
    assert parse_spec("answer_match") == ("answer_match", {})
    assert parse_spec('format_match(pattern="^A, B$", mode="search")') == (
        "format_match", {"pattern": "^A, B$", "mode": "search"})
    assert parse_spec("pkg.mod:fn(k=[1, 2], t=0.5)") == ("pkg.mod:fn", {"k": [1, 2], "t": 0.5})
    # bare words: strings, except true / false / none / null (any case)
    assert parse_spec("answer_match(extract=full, numeric=false, column=Answer, x=None, y=TRUE, z=null)") == (
        "answer_match", {"extract": "full", "numeric": False, "column": "Answer", "x": None, "y": True, "z": None})
    with pytest.raises(AlignkitError, match="key=value pairs, not positional"):
        parse_spec("fn(3)")
    with pytest.raises(AlignkitError, match="cannot read the settings"):
        parse_spec("fn(k=os.system)")


def user_file(tmp_path, body: str):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_load_function_from_a_file_a_module_and_the_builtins(tmp_path, monkeypatch):
    path = user_file(tmp_path, """
        def brevity(prompts, completions, scale=1.0, **kwargs):
            return [-scale * len(c) for c in completions]
    """)
    rf = load_function(f"{path}:brevity(scale=2.0)")
    assert rf.name == "brevity" and rf.source == f"user code from {path.resolve()}"
    assert rf.fn(prompts=["a", "b"], completions=["xy", "xyz"]) == [-4.0, -6.0]
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    assert load_function("my_rewards:brevity").source.startswith("user code from module my_rewards")
    builtin = load_function('format_match(pattern="[0-9]+")')
    assert builtin.source == "built-in" and builtin.fn(prompts=PROMPTS, completions=DONE) == [1.0, 0.0, 1.0, 0.0]


def test_load_function_errors_name_the_spec_and_what_is_wrong(tmp_path):
    path = user_file(tmp_path, "def brevity(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    with pytest.raises(AlignkitError, match=r"has no function `brevty`; did you mean `brevity`"):
        load_function(f"{path}:brevty")
    with pytest.raises(AlignkitError, match=r"no file .*missing\.py"):
        load_function(f"{tmp_path}/missing.py:f")
    with pytest.raises(AlignkitError, match="cannot import module `no_such_module_xyz`"):
        load_function("no_such_module_xyz:f")
    strict = tmp_path / "strict.py"
    strict.write_text("def f(prompts, completions):\n    return []\n")
    with pytest.raises(AlignkitError, match=r"takes no setting `scale` \(its parameters: \['prompts', 'completions'\]\)"):
        load_function(f"{strict}:f(scale=2)")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(AlignkitError, match=r"importing .*broken\.py failed: RuntimeError: boom at import"):
        load_function(f"{broken}:f")


def test_user_code_is_not_imported_until_named(tmp_path):
    marker = tmp_path / "imported"
    path = user_file(tmp_path, f"open({str(marker)!r}, 'w').close()\ndef f(prompts, completions, **kw):\n"
                               "    return [1.0] * len(completions)\n")
    cfg = RewardFunctionsConfig(functions=[])
    assert cfg.load_functions() == [] and not marker.exists()
    assert [rf.name for rf in RewardFunctionsConfig(functions=[f"{path}:f"]).load_functions()] == ["f"]
    assert marker.exists()


def test_columns_and_completion_ids_reach_the_function():
    seen = {}

    def with_ids(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(ids=completion_ids, answer=answer, other=sorted(kwargs))
        return [float(a == c) for a, c in zip(answer, completions, strict=True)]

    def text_only(prompts, completions, **kwargs):
        seen["text_only_keys"] = sorted(kwargs)
        return [0.5] * len(completions)

    runner = FunctionRunner()
    values, errors = runner.call(from_callable(with_ids), PROMPTS, DONE, {"answer": ["1", "2", "3", "4"], "id": [9] * 4},
                                 [[1], [2], [3], [4]], range(4))
    assert values == [1.0, 0.0, 1.0, 0.0] and errors == 0
    assert seen["ids"] == [[1], [2], [3], [4]] and seen["other"] == ["id"]
    runner.call(from_callable(text_only), PROMPTS, DONE, {"answer": ["1"] * 4}, [[1]] * 4, range(4))
    assert seen["text_only_keys"] == ["answer"]  # no completion_ids unless asked for


def raises_on_two(prompts, completions, **kwargs):
    if "two" in completions:
        raise ValueError("cannot score 'two'")
    return [1.0] * len(completions)


def test_a_raising_function_fails_naming_it_and_the_prompt_index():
    runner = FunctionRunner()
    with pytest.raises(AlignkitError, match=r"`raises_on_two` raised on prompt index 17: ValueError: cannot score"):
        runner.call(from_callable(raises_on_two), PROMPTS, DONE, {}, None, [16, 17, 18, 19])


def test_with_error_value_only_the_failing_rows_get_it_and_are_counted():
    runner = FunctionRunner(error_value=-1.0)
    values, errors = runner.call(from_callable(raises_on_two), PROMPTS, DONE, {}, None, range(4))
    assert values == [1.0, -1.0, 1.0, 1.0] and errors == 1


@pytest.mark.parametrize("bad, message", [
    (lambda prompts, completions, **kw: [1.0], r"returned 1 values for 4 completions"),
    (lambda prompts, completions, **kw: [1.0, math.nan, 0.0, 0.0], r"returned nan on prompt index 1"),
    (lambda prompts, completions, **kw: 1.0, r"returned float; expected a list of 4 floats"),
    (lambda prompts, completions, **kw: ["1", 1, 1, 1], r"returned '1' on prompt index 0"),
])
def test_a_wrong_return_is_an_error_naming_the_function(bad, message):
    with pytest.raises(AlignkitError, match=message):
        FunctionRunner().call(from_callable(bad, "bad"), PROMPTS, DONE, {}, None, range(4))


def test_a_hanging_function_times_out_in_a_worker(tmp_path):
    path = user_file(tmp_path, """
        import time
        def slow(prompts, completions, **kwargs):
            if any("two" in c for c in completions):
                time.sleep(60)
            return [1.0] * len(completions)
    """)
    rf = load_function(f"{path}:slow")
    runner = FunctionRunner(workers=2, timeout_s=3)
    try:
        start = time.monotonic()
        with pytest.raises(AlignkitError, match=r"`slow` timed out on a call on prompt indices 0..1: no result "
                                                r"within reward.timeout_s = 3 s"):
            runner.call(rf, PROMPTS, DONE, {}, None, range(4))
        assert time.monotonic() - start < 30
        scored = FunctionRunner(workers=2, timeout_s=3, error_value=0.25)
        values, errors = scored.call(rf, PROMPTS, DONE, {}, None, range(4))
        assert values == [0.25, 0.25, 1.0, 1.0] and errors == 2  # the hung chunk's rows; the pool restarts
        assert scored.call(rf, ["a", "b"], ["1", "3"], {}, None, range(2)) == ([1.0, 1.0], 0)
        scored.close()
    finally:
        runner.close()


def test_a_timeout_on_a_sync_function_in_process_is_refused():
    with pytest.raises(AlignkitError, match=r"`reward.timeout_s` \(5\) needs `reward.workers` >= 1"):
        FunctionRunner(timeout_s=5).check([from_callable(raises_on_two)])


def test_an_async_function_is_awaited_and_cancelled_at_the_timeout():
    async def fast(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [2.0] * len(completions)

    async def hangs(prompts, completions, **kwargs):
        await asyncio.sleep(60)

    runner = FunctionRunner(timeout_s=0.5)
    runner.check([from_callable(fast)])  # async: a timeout in-process is fine
    assert runner.call(from_callable(fast), PROMPTS, DONE, {}, None, range(4)) == ([2.0] * 4, 0)
    with pytest.raises(AlignkitError, match="`hangs` timed out"):
        runner.call(from_callable(hangs), PROMPTS, DONE, {}, None, range(4))


def test_none_means_not_applicable_and_unique_names_number_repeats():
    values, _ = FunctionRunner().call(from_callable(lambda prompts, completions, **kw: [None, 1, None, 0], "f"),
                                      PROMPTS, DONE, {}, None, range(4))
    assert values == [None, 1.0, None, 0.0]
    assert unique_names(["f", "g", "f", "f"]) == ["f", "g", "f_2", "f_3"]


def test_a_column_named_like_an_argument_or_setting_is_refused():
    rf = load_function('format_match(pattern="[0-9]")')
    with pytest.raises(AlignkitError, match=r"`format_match`: the prompt records have a column `pattern`"):
        FunctionRunner().call(rf, PROMPTS, DONE, {"pattern": ["x"] * 4}, None, range(4))
    with pytest.raises(AlignkitError, match=r"column `extract`"):  # a keyword-only setting, even unbound
        FunctionRunner().call(load_function("answer_match"), PROMPTS, DONE, {"answer": DONE, "extract": DONE},
                              None, range(4))
    with pytest.raises(AlignkitError, match=r"column `completions`"):
        FunctionRunner().call(from_callable(raises_on_two), PROMPTS, DONE, {"completions": DONE}, None, range(4))


def test_the_reasoning_gym_example_plugs_in_through_the_interface(monkeypatch):
    """examples/reasoning_gym_reward.py against a stand-in with reasoning-gym's API (the package is not
    installed here): the `entry` column reaches the verifier, row by row."""
    import types
    from pathlib import Path

    factory = types.ModuleType("reasoning_gym.factory")
    factory.get_score_answer_fn = lambda name: (lambda answer, entry: float(answer == entry["answer"]))
    monkeypatch.setitem(sys.modules, "reasoning_gym", types.ModuleType("reasoning_gym"))
    monkeypatch.setitem(sys.modules, "reasoning_gym.factory", factory)
    example = Path(__file__).resolve().parents[3] / "examples" / "reasoning_gym_reward.py"
    rf = load_function(f"{example}:score")
    entries = [{"question": "2+2?", "answer": "4", "metadata": {"source_dataset": "basic_arithmetic"}},
               {"question": "3+3?", "answer": "6", "metadata": {"source_dataset": "basic_arithmetic"}}]
    values, _ = FunctionRunner().call(rf, ["2+2?", "3+3?"], ["Let me see.\n4", "5"], {"entry": entries}, None, [0, 1])
    assert values == [1.0, 0.0]
