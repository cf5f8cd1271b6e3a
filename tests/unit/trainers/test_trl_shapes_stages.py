"""TRL's dataset shapes in JSONL, Parquet and `save_to_disk` form, read by the stages that take them, through
the loaders the stages use: DPO and reward (implicit prompts, HuggingFaceH4's layout), RL / best-of-N / label
(conversational prompts)."""

from __future__ import annotations

import pytest
from tests.conftest import build_tiny_tokenizer
from tests.unit.data.test_trl_shapes import CONVERSATIONAL_PROMPTS, FORMS, SHAPES, write_shape

from alignkit.config import DataConfig
from alignkit.data.prompts import split_preference_prompt
from alignkit.data.reward_groups import load_reward_data
from alignkit.data.tokenize import encode_prompt
from alignkit.stages.best_of_n import BestOfNConfig, load_prompts
from alignkit.stages.label import LabelConfig, resolve_inputs
from alignkit.trainers.dpo import DPOConfig, load_preference_data
from alignkit.trainers.reward import RewardConfig
from alignkit.trainers.rl_config import GRPOConfig
from alignkit.trainers.rl_setup import _load_prompts

PREFERENCE_SHAPES = ["implicit_conversation", "implicit_text", "h4"]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", PREFERENCE_SHAPES)
def test_dpo_reads_the_preference_shapes(tmp_path, tok, name, form):
    cfg = DPOConfig(data=DataConfig(path=write_shape(tmp_path, name, form), eval_fraction=0.0))
    data = load_preference_data(cfg, tok)
    rows = SHAPES[name]
    assert data["prompts_extracted"] == len(rows) and len(data["train"]) == len(rows)
    for group, record in zip(data["train"], rows, strict=True):
        prompt_ids = encode_prompt(tok, split_preference_prompt(record)["prompt"])
        for example in group["responses"]:  # the extracted prompt is the untrained head of both responses
            assert example["input_ids"][: len(prompt_ids)] == prompt_ids
            assert all(label == -100 for label in example["labels"][: len(prompt_ids)])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", PREFERENCE_SHAPES)
def test_reward_reads_the_preference_shapes(tmp_path, tok, name, form):
    cfg = RewardConfig(data=DataConfig(path=write_shape(tmp_path, name, form), eval_fraction=0.0))
    data = load_reward_data(cfg, tok)
    assert data["kind"] == "preference" and data["prompts_extracted"] == len(SHAPES[name])
    assert [r["prompt"] for r in data["records"]] == [split_preference_prompt(r)["prompt"] for r in SHAPES[name]]
    assert len(data["train"]) == len(SHAPES[name]) and all(len(g["items"]) == 2 for g in data["train"])


@pytest.mark.parametrize("form", FORMS)
def test_prompt_stages_read_conversational_prompts(tmp_path, form):
    path = write_shape(tmp_path, "conversational_prompts", form)
    expected = [r["prompt"] for r in CONVERSATIONAL_PROMPTS]
    train, held, *_ = _load_prompts(GRPOConfig(data=DataConfig(path=path, eval_fraction=0.25)), None)
    assert sorted(map(repr, train + held)) == sorted(map(repr, expected)) and len(held) == 1
    train, held, *_ = _load_prompts(GRPOConfig(data=DataConfig(path=path, eval_path=path)), None)
    assert train == expected and held == expected
    assert load_prompts(BestOfNConfig(prompts_path=path, max_prompts=0), None) == expected
    assert resolve_inputs(LabelConfig(prompts=path, heldout_prompts=path), None)["train"] == expected


def test_rl_prompts_are_validated_naming_file_row_and_field(tmp_path):
    import json

    from alignkit.errors import AlignkitError

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": [{"role": "assistant",
                                                                               "content": "x"}]}) + "\n")
    with pytest.raises(AlignkitError, match=r"p.jsonl, row 2, field 'prompt\[0\].role'"):
        _load_prompts(GRPOConfig(data=DataConfig(path=str(path), eval_path=str(path))), None)
