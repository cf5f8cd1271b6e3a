"""Hostile model directories: each bad file is one `error:` line naming it, exit status 2, no traceback.

The CLI cases run `alignkit.cli.main` in-process on the `sft` stage (it loads the tokenizer, the data,
then the model, and stops at the first user error). The pickle cases hold that nothing is ever
unpickled: every payload would create a marker file if it were.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tests.conftest import TINY_TEXTS, build_tiny_llama

from alignkit.cli import main
from alignkit.config import ModelConfig
from alignkit.errors import AlignkitError
from alignkit.models.load import load_causal_lm, load_sequence_classifier, load_tokenizer
from alignkit.models.reward_model import load_reward_model


class _TouchOnUnpickle:
    """Unpickling this object creates `marker`: stands in for a malicious weight file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture()
def marker(tmp_path) -> Path:
    """The file a payload would create; checked first that the payload really creates it when unpickled."""
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(probe)))
    assert probe.exists()
    return tmp_path / "MARKER"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    rows = [{"prompt": t[:12], "completion": t[12:]} for t in TINY_TEXTS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _copy(src: Path, tmp_path: Path, name: str = "model") -> Path:
    out = tmp_path / name
    shutil.copytree(src, out)
    return out


def _edit_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def _sft(capsys, model_dir: Path, data: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    """Run `alignkit sft` in-process; return (status, the `error:` line) after checking it is the only one."""
    capsys.readouterr()
    status = main(["sft", "--model.name_or_path", str(model_dir), "--data.path", str(data), "--output-dir",
                   str(tmp_path / "run"), "--data.eval_fraction", "0", "--run.report_to", "[]",
                   "--run.progress", "false", *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return status, errors[0]


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- 1. corrupt, truncated, oversized-header safetensors ----------------------------------------


def _corrupt(data: bytes, kind: str) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    return {
        "garbage": b"\x00garbage!" * 40,
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "truncated-header": data[: 8 + n // 2],
        "oversized-header": struct.pack("<Q", 2**40) + data[8:],
        "header-not-json": data[:8] + b"{" * n + data[8 + n :],
    }[kind]


@pytest.mark.parametrize(
    "kind", ["garbage", "empty", "truncated", "truncated-header", "oversized-header", "header-not-json"]
)
def test_corrupt_safetensors_names_the_file(capsys, tiny_llama_dir, data, tmp_path, kind):
    model_dir = _copy(tiny_llama_dir, tmp_path)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(_corrupt(weights.read_bytes(), kind))
    status, line = _sft(capsys, model_dir, data, tmp_path)
    assert status == 2
    assert f"{weights} is not a readable safetensors file" in line


def test_corrupt_safetensors_shard_is_named_for_a_reward_model(tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path)
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    (model_dir / "model-00002-of-00002.safetensors").write_bytes(b"\x00" * 64)
    names = sorted(tensors)
    weight_map = {k: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, k in enumerate(names)}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(AlignkitError) as excinfo:
        load_reward_model(str(model_dir))
    assert "model-00002-of-00002.safetensors is not a readable safetensors file" in _one_line(excinfo)

    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(AlignkitError, match="names the shard model-00002-of-00002.safetensors, which is not in"):
        load_sequence_classifier(ModelConfig(name_or_path=str(model_dir)))


# --- 2. config.json shapes that do not match the weights ----------------------------------------


@pytest.mark.parametrize("changes,tensor", [
    ({"hidden_size": 64}, "model.embed_tokens.weight"),
    ({"intermediate_size": 128}, "mlp.down_proj.weight"),
    ({"vocab_size": 400}, "model.embed_tokens.weight"),
], ids=["hidden_size", "intermediate_size", "vocab_size"])
def test_config_shapes_that_do_not_match_the_weights(capsys, tiny_llama_dir, data, tmp_path, changes, tensor):
    model_dir = _copy(tiny_llama_dir, tmp_path)
    _edit_config(model_dir, **changes)
    status, line = _sft(capsys, model_dir, data, tmp_path)
    assert status == 2
    assert f"{model_dir}/config.json does not match the weights" in line and tensor in line
    with pytest.raises(AlignkitError, match="does not match the weights"):
        load_sequence_classifier(ModelConfig(name_or_path=str(model_dir)))


def test_config_with_more_layers_than_the_weights_is_refused(tiny_llama_dir, tmp_path):
    # Today the third layer would be silently random.
    model_dir = _copy(tiny_llama_dir, tmp_path)
    _edit_config(model_dir, num_hidden_layers=3)
    with pytest.raises(AlignkitError) as excinfo:
        load_causal_lm(ModelConfig(name_or_path=str(model_dir)))
    message = _one_line(excinfo)
    assert f"{model_dir}/config.json describes 9 weight(s) that are not in the weights" in message
    assert "model.layers.2." in message


def test_config_with_fewer_layers_than_the_weights_says_so(capsys, tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path)
    _edit_config(model_dir, num_hidden_layers=1)
    capsys.readouterr()
    load_causal_lm(ModelConfig(name_or_path=str(model_dir)))
    out = capsys.readouterr()
    assert "9 weight(s) in the files are not used" in out.out and "model.layers.1." in out.out
    assert "LOAD REPORT" not in out.out + out.err


def test_a_new_reward_head_is_not_an_error(capsys, tiny_llama_dir):
    capsys.readouterr()
    model = load_sequence_classifier(ModelConfig(name_or_path=str(tiny_llama_dir)), num_labels=1)
    assert model.score.weight.shape == (1, 32)
    out = capsys.readouterr()
    assert "note:" not in out.out and "LOAD REPORT" not in out.out + out.err


# --- 3. binary or invalid config.json (and other JSON files) ------------------------------------


@pytest.mark.parametrize("content,expected", [
    (b"\xff\xfe\x00\x01binary\x80", "is not UTF-8 text (byte 0xff at offset 0)"),
    (b'{"model_type": "llama",', "is not valid JSON: Expecting property name"),
    (b"", "is not valid JSON: Expecting value at line 1, column 1"),
    (b"[1, 2]", "must hold a JSON object, not a list"),
], ids=["binary", "invalid", "empty", "list"])
def test_bad_config_json_names_the_file(capsys, tiny_llama_dir, data, tmp_path, content, expected):
    model_dir = _copy(tiny_llama_dir, tmp_path)
    (model_dir / "config.json").write_bytes(content)
    status, line = _sft(capsys, model_dir, data, tmp_path)
    assert status == 2
    assert f"{model_dir}/config.json {expected}" in line
    with pytest.raises(AlignkitError, match="config.json"):
        load_causal_lm(ModelConfig(name_or_path=str(model_dir)))


@pytest.mark.parametrize("name", ["tokenizer_config.json", "tokenizer.json"])
def test_binary_tokenizer_file_names_the_file(tiny_llama_dir, tmp_path, name):
    model_dir = _copy(tiny_llama_dir, tmp_path)
    (model_dir / name).write_bytes(b"\xff\xfe\x80binary")
    with pytest.raises(AlignkitError) as excinfo:
        load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    assert f"{model_dir / name} is not UTF-8 text" in _one_line(excinfo)


def test_config_value_of_the_wrong_type_is_one_line(tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path)
    _edit_config(model_dir, hidden_size="abc")
    for load in (load_tokenizer, load_causal_lm):
        with pytest.raises(AlignkitError) as excinfo:
            load(ModelConfig(name_or_path=str(model_dir)))
        assert "config.json" in _one_line(excinfo) and "hidden_size" in str(excinfo.value)


# --- 4. --model.allow_unsafe_pickle on a file torch's weights-only loader refuses ---------------


def _pickle_model(tiny_llama_dir: Path, tmp_path: Path, payload: object, how: str) -> Path:
    model_dir = _copy(tiny_llama_dir, tmp_path, "pickled")
    (model_dir / "model.safetensors").unlink()
    name = "pytorch_model-00001-of-00001.bin" if how == "sharded" else "pytorch_model.bin"
    if how == "pickle":
        (model_dir / name).write_bytes(pickle.dumps({"model": payload}))
    else:
        torch.save({"model.embed_tokens.weight": payload}, model_dir / name)
    if how == "sharded":
        weight_map = {"model.embed_tokens.weight": name}
        index = {"metadata": {}, "weight_map": weight_map}
        (model_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return model_dir


@pytest.mark.parametrize("how", ["pickle", "torch.save", "sharded"])
def test_allow_unsafe_pickle_still_never_unpickles_objects(capsys, tiny_llama_dir, data, tmp_path, marker, how):
    model_dir = _pickle_model(tiny_llama_dir, tmp_path, _TouchOnUnpickle(marker), how)
    bad = next(model_dir.glob("pytorch_model*.bin"))
    (model_dir / "optimizer.pt").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))  # not what is named
    status, line = _sft(capsys, model_dir, data, tmp_path, "--model.allow_unsafe_pickle", "true")
    assert status == 2
    assert f"{bad}: torch's weights-only loader refused it" in line
    assert "never unpickles arbitrary objects" in line and "weights_only" not in line
    with pytest.raises(AlignkitError, match="weights-only loader refused"):
        load_sequence_classifier(ModelConfig(name_or_path=str(model_dir), allow_unsafe_pickle=True))
    assert not marker.exists()


def test_allow_unsafe_pickle_loads_a_plain_tensor_pickle(tiny_llama_dir, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path)
    torch.save(load_file(model_dir / "model.safetensors"), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    model = load_causal_lm(ModelConfig(name_or_path=str(model_dir), allow_unsafe_pickle=True))
    reference = load_file(tiny_llama_dir / "model.safetensors")
    assert torch.equal(model.model.embed_tokens.weight, reference["model.embed_tokens.weight"])


# --- 5. missing tokenizer files; a vocabulary smaller than the tokenizer ------------------------


def test_missing_tokenizer_json_says_what_is_missing(capsys, tiny_llama_dir, data, tmp_path):
    model_dir = _copy(tiny_llama_dir, tmp_path)
    (model_dir / "tokenizer.json").unlink()
    status, line = _sft(capsys, model_dir, data, tmp_path)
    assert status == 2
    assert f"no tokenizer files in {model_dir} (expected tokenizer.json" in line
    assert "sentencepiece" not in line and "--model.tokenizer" in line


def test_smaller_model_vocabulary_is_resized_with_a_note(capsys, tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "small_vocab"
    build_tiny_llama(280).save_pretrained(model_dir, safe_serialization=True)
    cfg = ModelConfig(name_or_path=str(model_dir), tokenizer=str(tiny_llama_dir))
    tokenizer = load_tokenizer(cfg)
    assert len(tokenizer) == 300
    capsys.readouterr()
    model = load_causal_lm(cfg, tokenizer)
    assert model.get_input_embeddings().num_embeddings == 300
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1
    assert str(model_dir) in notes[0] and "280 token embeddings" in notes[0] and "300 tokens" in notes[0]

    capsys.readouterr()
    same = ModelConfig(name_or_path=str(tiny_llama_dir))
    load_causal_lm(same, load_tokenizer(same))
    assert "note:" not in capsys.readouterr().out  # same sizes: nothing to say


# --- 7. no pickle ever executes -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt", "state.pkl"])
@pytest.mark.parametrize("allow", [False, True], ids=["default", "allow_unsafe_pickle"])
def test_pickle_weight_files_never_execute(tiny_llama_dir, tmp_path, marker, name, allow):
    model_dir = _copy(tiny_llama_dir, tmp_path)
    (model_dir / "model.safetensors").unlink()
    (model_dir / name).write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    cfg = ModelConfig(name_or_path=str(model_dir), allow_unsafe_pickle=allow)
    for load in (load_causal_lm, load_sequence_classifier):
        with pytest.raises(AlignkitError) as excinfo:
            load(cfg)
        # Refused by name; with the option, the weights-only loader refuses pytorch_model.bin, and
        # transformers never looks at the other suffixes.
        assert (name if not allow or name == "pytorch_model.bin" else str(model_dir)) in _one_line(excinfo)
    assert not marker.exists()


def test_pickle_only_model_via_the_cli_never_executes(capsys, tiny_llama_dir, data, tmp_path, marker):
    model_dir = _pickle_model(tiny_llama_dir, tmp_path, _TouchOnUnpickle(marker), "pickle")
    status, line = _sft(capsys, model_dir, data, tmp_path)
    assert status == 2 and "only pickle file pytorch_model.bin" in line
    assert not marker.exists()


def test_sharded_pickles_never_execute(tiny_llama_dir, tmp_path, marker):
    model_dir = _pickle_model(tiny_llama_dir, tmp_path, _TouchOnUnpickle(marker), "sharded")
    with pytest.raises(AlignkitError, match=r"pytorch_model-00001-of-00001\.bin.*allow_unsafe_pickle"):
        load_causal_lm(ModelConfig(name_or_path=str(model_dir)))
    # A safetensors index naming the pickle shard: read as safetensors (header only), never unpickled.
    (model_dir / "pytorch_model.bin.index.json").rename(model_dir / "model.safetensors.index.json")
    with pytest.raises(AlignkitError, match=r"pytorch_model-00001-of-00001\.bin is not a readable safetensors"):
        load_causal_lm(ModelConfig(name_or_path=str(model_dir), allow_unsafe_pickle=True))
    assert not marker.exists()


def test_config_naming_a_pickle_never_executes(capsys, tiny_llama_dir, data, tmp_path, marker):
    model_dir = _copy(tiny_llama_dir, tmp_path)
    (model_dir / "adapter_model.bin").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    _edit_config(model_dir, transformers_weights="adapter_model.bin")
    status, line = _sft(capsys, model_dir, data, tmp_path)
    assert status == 2 and f"{model_dir}/config.json names the weight file 'adapter_model.bin'" in line
    assert not marker.exists()


def test_yaml_python_object_tag_never_executes(capsys, tiny_llama_dir, data, tmp_path, marker):
    payload = f"!!python/object/apply:builtins.open [{str(marker)!r}, 'w']"
    probe = tmp_path / "probe.yaml"
    probe.write_text(f"x: !!python/object/apply:builtins.open [{str(tmp_path / 'yaml_probe')!r}, 'w']\n")
    yaml.unsafe_load(probe.read_text())["x"].close()  # the tag really runs code when loaded unsafely
    assert (tmp_path / "yaml_probe").exists()

    config = tmp_path / "sft.yaml"
    config.write_text(f"model:\n  name_or_path: {payload}\ndata:\n  path: {data}\n")
    capsys.readouterr()
    status = main(["sft", str(config), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert f"config file {config} is not valid YAML" in err
    assert not marker.exists()
