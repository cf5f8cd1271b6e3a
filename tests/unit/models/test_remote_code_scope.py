"""Trust is per model path: the policy's `trust_remote_code` never runs code shipped with another model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from alignkit.accel.plain import PlainBackend
from alignkit.config import ModelConfig
from alignkit.models.load import load_causal_lm, load_tokenizer, remote_code_plan
from alignkit.trainers.dpo import DPOConfig, load_reference

MODELING = '''
from pathlib import Path
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

Path(MARKER).write_text("remote code ran")


class EvilLlama(LlamaForCausalLM):
    pass


class EvilLlamaScore(LlamaForSequenceClassification):
    pass
'''


def _with_code(tmp_path: Path, source: Path) -> Path:
    """A copy of `source` whose config maps the Auto classes to a `modeling_evil.py` beside it."""
    out = tmp_path / "with_code"
    shutil.copytree(source, out)
    (out / "modeling_evil.py").write_text(f"MARKER = {str(tmp_path / 'RAN')!r}\n" + MODELING)
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilLlama",
                          "AutoModelForSequenceClassification": "modeling_evil.EvilLlamaScore"}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture()
def remote_code_dir(tmp_path, tiny_llama_dir) -> Path:
    """The tiny Llama (a policy) with remote code."""
    return _with_code(tmp_path, tiny_llama_dir)


@pytest.fixture()
def remote_code_reward_dir(tmp_path, reward_dir) -> Path:
    """A tiny reward model with remote code."""
    return _with_code(tmp_path, reward_dir)


def _ran(directory: Path) -> bool:
    """Whether the model's code ran: it writes RAN beside its directory (the path is baked into the file)."""
    return (directory.parent / "RAN").exists()


def test_the_policys_trust_does_not_reach_the_reference(tiny_llama_dir, remote_code_dir):
    policy_cfg = ModelConfig(name_or_path=str(tiny_llama_dir), trust_remote_code=True)
    tokenizer = load_tokenizer(policy_cfg)
    policy = load_causal_lm(policy_cfg, tokenizer)
    cfg = DPOConfig(model=policy_cfg, ref_model=str(remote_code_dir))
    ref = load_reference(cfg, policy, tokenizer, torch.device("cpu"), PlainBackend())
    assert type(ref.module).__name__ == "LlamaForCausalLM" and not _ran(remote_code_dir)
    trusted = DPOConfig(model=policy_cfg, ref_model=str(remote_code_dir), ref_trust_remote_code=True)
    ref = load_reference(trusted, policy, tokenizer, torch.device("cpu"), PlainBackend())
    assert type(ref.module).__name__ == "EvilLlama" and _ran(remote_code_dir)


def test_the_plan_names_the_models_that_may_run_code():
    assert remote_code_plan({"policy": ("a", False), "reference": ("", True)}).startswith("none")
    assert remote_code_plan({"policy": ("a", True), "reference": ("b", False)}) == "may run: policy (a)"


def test_the_policys_trust_does_not_reach_a_value_model_from_the_reward_model(tiny_llama_dir, remote_code_reward_dir):
    remote_code_dir = remote_code_reward_dir
    from alignkit.trainers.rl_config import PPOConfig, RewardSourceConfig
    from alignkit.trainers.rl_setup import _load_models, _remote_code

    policy_cfg = ModelConfig(name_or_path=str(tiny_llama_dir), trust_remote_code=True)
    tokenizer = load_tokenizer(policy_cfg)
    cfg = PPOConfig(model=policy_cfg, reward=RewardSourceConfig(model=str(remote_code_dir)), value_model="reward")
    _load_models(cfg, tokenizer, PlainBackend())
    assert not _ran(remote_code_dir)
    assert _remote_code(cfg) == f"may run: policy ({tiny_llama_dir})"
    cfg.reward.trust_remote_code = True
    _load_models(cfg, tokenizer, PlainBackend())
    assert _ran(remote_code_dir)
    assert f"value model ({remote_code_dir})" in _remote_code(cfg)


def test_single_model_stages_say_whether_their_model_runs_code(tmp_path, tiny_llama_dir, capsys):
    from alignkit.config import OptimConfig, RunConfig
    from alignkit.trainers.loop import TrainLoop
    from alignkit.trainers.sft import SFTConfig

    for trust, expected in ((False, "remote code: none"), (True, f"remote code: may run: model ({tiny_llama_dir})")):
        cfg = SFTConfig(model=ModelConfig(name_or_path=str(tiny_llama_dir), trust_remote_code=trust),
                        run=RunConfig(output_dir=str(tmp_path / f"run-{trust}"), report_to=[], progress=False),
                        optim=OptimConfig(max_steps=1))
        model = load_causal_lm(cfg.model, load_tokenizer(cfg.model))
        loop = TrainLoop("sft", cfg, model, n_examples=4)
        loop.print_plan(n_examples=4)
        loop.close()
        assert expected in capsys.readouterr().out
