"""Tests of alignkit.models.save: HF-format output, merged LoRA, atomic replacement."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignkit.config import ModelConfig
from alignkit.errors import AlignkitError
from alignkit.models.load import load_causal_lm, load_sequence_classifier, load_tokenizer
from alignkit.models.save import save_pretrained_atomic


def _randomise_lora_b(model) -> None:
    """LoRA B starts at zero (adapter = identity); make it non-zero so merging changes the weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)


def _inputs(tokenizer):
    return tokenizer(["the quick brown fox", "I loved it"], return_tensors="pt", padding=True)


def test_plain_model_saves_in_hf_format(tiny_llama_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir))
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tokenizer=tokenizer).eval()
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "final")
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert not any(name.endswith(".bin") for name in files)
    generation = json.loads((out / "generation_config.json").read_text())
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert (generation["pad_token_id"], generation["eos_token_id"], generation["bos_token_id"]) == ids
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temp dirs left

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    assert reloaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    batch = _inputs(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


def test_lora_model_is_saved_merged_and_keeps_its_adapters(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    cfg = ModelConfig(name_or_path=str(tiny_llama_dir), lora_r=4, lora_alpha=8.0)
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tokenizer=tokenizer).eval()
    _randomise_lora_b(model)
    batch = _inputs(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
        with model.disable_adapter():
            base_logits = model(**batch).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapters matter

    out = save_pretrained_atomic(model, tokenizer, tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not isinstance(reloaded, PeftModel)
    assert not any("lora_" in name for name, _ in reloaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)

    # The in-memory training model is untouched: still a PeftModel with trainable adapters.
    assert isinstance(model, PeftModel)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected)


def test_resized_lora_model_round_trips(tiny_llama_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir), lora_r=2)
    tokenizer = load_tokenizer(cfg)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    model = load_causal_lm(cfg, tokenizer=tokenizer).eval()
    assert model.get_input_embeddings().num_embeddings == 301
    _randomise_lora_b(model)
    batch = tokenizer(["<|extra|> the fox"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "final")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.vocab_size == 301
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_lora_adapter_only(tiny_llama_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir), lora_r=4)
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tokenizer=tokenizer)
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "adapter", merge_lora=False)
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files


def test_reward_model_with_lora_round_trips(tiny_llama_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir), lora_r=4)
    tokenizer = load_tokenizer(cfg)
    model = load_sequence_classifier(cfg, tokenizer=tokenizer).eval()
    _randomise_lora_b(model)
    batch = _inputs(tokenizer)
    with torch.no_grad():
        expected = model(**batch).logits
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "rm")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.config.num_labels == 1
    assert reloaded.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_existing_directory_is_replaced(tiny_llama_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir))
    tokenizer = load_tokenizer(cfg)
    out = tmp_path / "final"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_pretrained_atomic(load_causal_lm(cfg, tokenizer=tokenizer), tokenizer, out)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_failure_midway_keeps_old_directory(tiny_llama_dir, tmp_path, monkeypatch):
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir))
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tokenizer=tokenizer)
    out = tmp_path / "final"
    save_pretrained_atomic(model, tokenizer, out)
    old_files = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_save(self, save_directory, **kwargs):
        (save_directory / "tokenizer.json").write_text("{half-written")  # some files already exist
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(model, tokenizer, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # the temp dir was removed

    # A failure before anything existed leaves no `out_dir` at all.
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(model, tokenizer, fresh)
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_failed_swap_restores_old_directory(tiny_llama_dir, tmp_path, monkeypatch):
    import alignkit.atomic as atomic_mod

    cfg = ModelConfig(name_or_path=str(tiny_llama_dir))
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tokenizer=tokenizer)
    out = tmp_path / "final"
    save_pretrained_atomic(model, tokenizer, out)
    old_files = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace = atomic_mod.os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic_mod.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_pretrained_atomic(model, tokenizer, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old_files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_out_dir_that_is_a_file_is_an_error(tiny_llama_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir))
    target = tmp_path / "final"
    target.write_text("not a directory")
    with pytest.raises(AlignkitError, match="not a directory"):
        save_pretrained_atomic(load_causal_lm(cfg), None, target)
