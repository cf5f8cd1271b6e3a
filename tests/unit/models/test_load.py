"""Tests of alignkit.models.load: pad tokens, chat template, safe loading, options passed through, LoRA."""

from __future__ import annotations

import pathlib
import pickle
import shutil

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DistilBertConfig,
    DistilBertModel,
    PreTrainedTokenizerFast,
)

from alignkit.config import ModelConfig
from alignkit.errors import AlignkitError
from alignkit.models import load as load_mod
from alignkit.models.load import (
    DEFAULT_CHAT_TEMPLATE,
    PAD_TOKEN,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
)
from alignkit.models.weight_files import check_weight_files

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "I loved this movie, it was wonderful and the actors were great!",
    "Terrible film. I hated every minute of it.",
]


def _tokenizer_without_pad_token(out: pathlib.Path, pad: str | None) -> pathlib.Path:
    """A 300-token BPE with no `<|pad|>` in its vocabulary; its pad token is `pad` (None or the EOS)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS * 4, trainer)
    extra = {} if pad is None else {"pad_token": pad}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>", **extra
    )
    assert len(tokenizer) == 300 and PAD_TOKEN not in tokenizer.get_vocab()
    tokenizer.save_pretrained(out)
    return out


def test_tokenizer_with_distinct_pad_is_kept(tiny_llama_dir):
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama_dir)))
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert len(tokenizer) == 300
    assert tokenizer.padding_side == "right"
    assert tokenizer("hello").input_ids[0] == tokenizer.bos_token_id  # BOS kept


@pytest.mark.parametrize("pad", [None, "<|eos|>"], ids=["missing", "same-as-eos"])
def test_pad_added_and_embeddings_resized(tiny_llama_dir, tmp_path, pad):
    tok_dir = _tokenizer_without_pad_token(tmp_path / "tok", pad)
    before = AutoTokenizer.from_pretrained(tok_dir)
    assert before.pad_token is None or before.pad_token_id == before.eos_token_id
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir), tokenizer=str(tok_dir))

    tokenizer = load_tokenizer(cfg, padding_side="left")
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id == 300  # a new token, not the EOS
    assert tokenizer.eos_token == "<|eos|>" and tokenizer.bos_token == "<|bos|>"
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) == 301

    model = load_causal_lm(cfg, tokenizer=tokenizer)
    assert model.get_input_embeddings().num_embeddings == 301
    assert model.get_output_embeddings().weight.shape[0] == 301
    assert model.config.pad_token_id == 300
    assert model.generation_config.pad_token_id == 300
    assert model.config.eos_token_id == tokenizer.eos_token_id
    batch = tokenizer(["hi", "the quick brown fox"], return_tensors="pt", padding=True)
    assert batch.input_ids[0, 0] == 300  # left padding with the new id
    assert model(**batch).logits.shape == (*batch.input_ids.shape, 301)


def test_default_chat_template_is_set_and_renders(tiny_llama_dir, tmp_path):
    tok_dir = _tokenizer_without_pad_token(tmp_path / "tok", None)
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama_dir), tokenizer=str(tok_dir)))
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe kind.<|eos|>\n<|im_start|>user\nHi<|eos|>\n<|im_start|>assistant\nHello!<|eos|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert (
        prompt == "<|im_start|>system\nBe kind.<|eos|>\n<|im_start|>user\nHi<|eos|>\n<|im_start|>assistant\n"
    )
    assert text.startswith(prompt)
    with pytest.raises(Exception, match="roles must be"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_existing_chat_template_is_kept(tiny_llama_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama_dir), tokenizer=str(tmp_path)))
    assert loaded.chat_template == "{{ messages[0]['content'] }}"


# --- safe loading -------------------------------------------------------------------------------


class _TouchOnUnpickle:
    """Unpickling this object creates a file: stands in for a malicious checkpoint."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_only_directory_is_refused_without_unpickling(tiny_llama_dir, tmp_path):
    # The payload really runs when unpickled (so the test below means something).
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(probe)))
    assert probe.exists()

    model_dir = tmp_path / "evil_model"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"model": _TouchOnUnpickle(marker)}))

    cfg = ModelConfig(name_or_path=str(model_dir))
    for load in (load_causal_lm, load_sequence_classifier):
        with pytest.raises(AlignkitError, match=r"pytorch_model\.bin.*--model\.allow_unsafe_pickle"):
            load(cfg)
    with pytest.raises(AlignkitError, match="pytorch_model.bin"):
        check_weight_files(model_dir, allow_unsafe_pickle=False)
    assert not marker.exists()
    check_weight_files(model_dir, allow_unsafe_pickle=True)  # the user's explicit choice
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "last.ckpt", "state.pkl"])
def test_other_pickle_suffixes_are_refused(tmp_path, name):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / name).write_bytes(b"not read")
    with pytest.raises(AlignkitError, match=name.replace(".", r"\.")):
        check_weight_files(tmp_path, allow_unsafe_pickle=False)


def test_safetensors_beside_pickle_is_accepted(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "both"
    shutil.copytree(tiny_llama_dir, model_dir)
    marker = tmp_path / "MARKER"
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    check_weight_files(model_dir, allow_unsafe_pickle=False)
    model = load_causal_lm(ModelConfig(name_or_path=str(model_dir)))
    assert model.config.vocab_size == 300
    assert not marker.exists()


def test_config_naming_a_pickle_weights_file_is_refused(tiny_llama_dir, tmp_path):
    import json

    model_dir = tmp_path / "explicit"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["transformers_weights"] = "adapter_model.bin"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(AlignkitError, match="adapter_model.bin"):
        load_causal_lm(ModelConfig(name_or_path=str(model_dir)))


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "a/b/c"])
def test_missing_local_path_names_path_and_option(path):
    with pytest.raises(AlignkitError, match=r"--model\.name_or_path.*does not exist"):
        load_causal_lm(ModelConfig(name_or_path=path))
    with pytest.raises(AlignkitError, match=r"--model\.name_or_path"):
        load_tokenizer(ModelConfig(name_or_path=path))


def test_empty_name_and_file_path_are_errors(tmp_path):
    with pytest.raises(AlignkitError, match="is empty"):
        load_causal_lm(ModelConfig())
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(AlignkitError, match="is a file"):
        load_causal_lm(ModelConfig(name_or_path=str(weights)))
    with pytest.raises(AlignkitError, match=r"--model\.tokenizer"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path), tokenizer=str(tmp_path / "nope")))


def test_model_that_is_not_a_causal_lm_is_an_error(tmp_path):
    DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=64)).save_pretrained(tmp_path)
    with pytest.raises(AlignkitError, match=r"causal language model.*--model\.name_or_path"):
        load_causal_lm(ModelConfig(name_or_path=str(tmp_path)))


def test_directory_without_weights_is_an_error(tiny_tokenizer_dir):
    with pytest.raises(AlignkitError, match=str(tiny_tokenizer_dir)):
        load_causal_lm(ModelConfig(name_or_path=str(tiny_tokenizer_dir)))


# --- options passed through ---------------------------------------------------------------------


def test_trust_remote_code_and_dtype_are_passed_through(tiny_llama_dir, monkeypatch):
    assert ModelConfig().trust_remote_code is False
    seen: list[dict] = []

    def spy(original):
        def from_pretrained(*args, **kwargs):
            seen.append(kwargs)
            return original(*args, **kwargs)

        return from_pretrained

    monkeypatch.setattr(load_mod.AutoTokenizer, "from_pretrained", spy(AutoTokenizer.from_pretrained))
    monkeypatch.setattr(
        load_mod.AutoModelForCausalLM, "from_pretrained", spy(AutoModelForCausalLM.from_pretrained)
    )
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir))
    load_causal_lm(cfg, tokenizer=load_tokenizer(cfg))
    assert [kw["trust_remote_code"] for kw in seen] == [False, False]
    assert seen[1]["use_safetensors"] is True

    seen.clear()
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir), trust_remote_code=True, dtype="bfloat16")
    model = load_causal_lm(cfg, tokenizer=load_tokenizer(cfg))
    assert [kw["trust_remote_code"] for kw in seen] == [True, True]
    assert model.dtype == torch.bfloat16

    seen.clear()
    load_causal_lm(ModelConfig(name_or_path=str(tiny_llama_dir), allow_unsafe_pickle=True))
    assert seen[0]["use_safetensors"] is None


# --- LoRA and classifiers -----------------------------------------------------------------------


def test_lora_wraps_all_linear_layers_but_the_head(tiny_llama_dir):
    from peft import PeftModel

    cfg = ModelConfig(name_or_path=str(tiny_llama_dir), lora_r=4, lora_alpha=8.0)
    model = load_causal_lm(cfg, tokenizer=load_tokenizer(cfg))
    assert isinstance(model, PeftModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    targets = {name.rsplit(".", 1)[-1] for name in model.peft_config["default"].target_modules}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_with_named_targets(tiny_llama_dir):
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir), lora_r=2, lora_target_modules=["q_proj", "v_proj"])
    model = load_causal_lm(cfg)
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    bad = ModelConfig(
        name_or_path=str(tiny_llama_dir), lora_r=2, lora_target_modules=["all-linear", "q_proj"]
    )
    with pytest.raises(AlignkitError, match="lora_target_modules"):
        load_causal_lm(bad)
    missing = ModelConfig(
        name_or_path=str(tiny_llama_dir), lora_r=2, lora_target_modules=["nonexistent_proj"]
    )
    with pytest.raises(AlignkitError, match="lora_target_modules"):
        load_causal_lm(missing)


def test_sequence_classifier_scalar_head_and_pad_id(tiny_llama_dir):
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir))
    tokenizer = load_tokenizer(cfg)
    model = load_sequence_classifier(cfg, tokenizer=tokenizer)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["good", "a much longer sentence"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 1)


def test_sequence_classifier_lora_trains_the_head(tiny_llama_dir):
    cfg = ModelConfig(name_or_path=str(tiny_llama_dir), lora_r=4)
    model = load_sequence_classifier(cfg, num_labels=1, tokenizer=load_tokenizer(cfg))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("score" in n and "lora_" not in n for n in trainable)
    assert not any("score" in n and "lora_" in n for n in trainable)
