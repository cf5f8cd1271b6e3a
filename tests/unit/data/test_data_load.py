"""Loading records from files, saved `datasets` directories and (mocked) hub ids; the eval split."""

import csv
import json

import datasets
import pytest

from alignkit.data import load as load_module
from alignkit.data.load import load_records, split_records
from alignkit.errors import AlignkitError

RECORDS = [
    {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Sky?", "chosen": "Blue", "rejected": "Green"},
]


def test_jsonl_reads_objects_and_skips_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
    assert load_records(str(path)) == RECORDS[:2]


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]) + "\n" + '{"prompt": "x",\n')
    with pytest.raises(AlignkitError, match=r"train\.jsonl, line 3: not valid JSON") as info:
        load_records(str(path))
    assert str(path) in str(info.value)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n[1, 2]\n")
    with pytest.raises(AlignkitError, match=r"train\.jsonl, line 2: expected a JSON object, got a list"):
        load_records(str(path))


def test_json_list_and_object_with_one_list(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(RECORDS))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "data": RECORDS}))
    assert load_records(str(plain)) == RECORDS
    assert load_records(str(wrapped)) == RECORDS


def test_json_errors(tmp_path):
    two_lists = tmp_path / "two.json"
    two_lists.write_text(json.dumps({"a": RECORDS, "b": RECORDS}))
    with pytest.raises(AlignkitError, match="exactly one list of records; found an object with 2"):
        load_records(str(two_lists))
    not_objects = tmp_path / "ints.json"
    not_objects.write_text("[{}, 3]")
    with pytest.raises(AlignkitError, match=r"ints\.json, record 2: expected a JSON object, got a number"):
        load_records(str(not_objects))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"a": 1},\n{"a": }\n]')
    with pytest.raises(AlignkitError, match=r"broken\.json, line 3: not valid JSON"):
        load_records(str(broken))


def test_csv_converts_numeric_and_boolean_columns(tmp_path):
    path = tmp_path / "ratings.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "response", "score", "best", "label"])
        writer.writerow(["Hi, there", "Hello", "0.5", "1", "true"])
        writer.writerow(["12", "Bye", "-2", "0", "False"])
    records = load_records(str(path))
    assert records == [
        {"prompt": "Hi, there", "response": "Hello", "score": 0.5, "best": 1, "label": True},
        {"prompt": "12", "response": "Bye", "score": -2.0, "best": 0, "label": False},
    ]
    assert type(records[0]["best"]) is int and type(records[1]["score"]) is float


def test_csv_row_with_wrong_number_of_values(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,completion\nHi,Hello\nOnly one value\n")
    with pytest.raises(AlignkitError, match=r"bad\.csv, line 3: the number of values differs"):
        load_records(str(path))


def test_parquet(tmp_path):
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(RECORDS).to_parquet(str(path))
    assert load_records(str(path)) == RECORDS


def test_saved_dataset_directory(tmp_path):
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    assert load_records(str(tmp_path / "ds")) == RECORDS


@pytest.fixture
def dataset_dict_dir(tmp_path):
    dataset_dict = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(RECORDS[:2]), "test": datasets.Dataset.from_list(RECORDS[2:])}
    )
    dataset_dict.save_to_disk(str(tmp_path / "dd"))
    return tmp_path / "dd"


def test_saved_dataset_dict_picks_split(dataset_dict_dir):
    assert load_records(str(dataset_dict_dir), split="test") == RECORDS[2:]
    with pytest.raises(AlignkitError, match="no split 'validation'; available splits: train, test"):
        load_records(str(dataset_dict_dir), split="validation")


def test_saved_dataset_dict_split_named_in_the_source_as_for_hub_ids(dataset_dict_dir, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("a local directory, not the hub"))
    assert load_records(f"{dataset_dict_dir}:test") == RECORDS[2:]
    assert load_records(f"{dataset_dict_dir}:train") == RECORDS[:2]
    assert load_records(f"{dataset_dict_dir}:test", split="train") == RECORDS[2:]  # the source's split wins
    with pytest.raises(AlignkitError, match="no split 'validation'; available splits: train, test"):
        load_records(f"{dataset_dict_dir}:validation")


def test_saved_dataset_dict_without_a_split_is_an_error_not_the_train_split(dataset_dict_dir):
    """`--data.eval_path DIR` used to read `train` again: held-out data = training data."""
    with pytest.raises(AlignkitError, match=r"a DatasetDict with splits train, test; name one as DIR:SPLIT") as info:
        load_records(str(dataset_dict_dir))
    assert f"{dataset_dict_dir}:train" in str(info.value)


def test_plain_saved_dataset_needs_no_split_and_refuses_one(tmp_path):
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    assert load_records(str(tmp_path / "ds"), split="test") == RECORDS  # a caller's default split is ignored
    with pytest.raises(AlignkitError, match="a single saved Dataset, without splits"):
        load_records(f"{tmp_path / 'ds'}:test")


def test_dir_split_whose_dir_does_not_exist_is_a_hub_id(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, split: calls.append((name, split)) or datasets.Dataset.from_list(RECORDS))
    assert load_records("org/name:test") == RECORDS and calls == [("org/name", "test")]
    (tmp_path / "org").mkdir()  # a parent that exists does not make `org/name` local
    assert load_records("org/name:test") == RECORDS and calls[-1] == ("org/name", "test")


def test_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(AlignkitError, match="not a dataset saved with `save_to_disk`"):
        load_records(str(tmp_path))


@pytest.mark.parametrize(
    ("source", "split", "expected"),
    [
        ("imdb", None, ("imdb", "train")),
        ("Anthropic/hh-rlhf", None, ("Anthropic/hh-rlhf", "train")),
        ("Anthropic/hh-rlhf:test", None, ("Anthropic/hh-rlhf", "test")),
        ("trl-lib/ultrafeedback_binarized", "test", ("trl-lib/ultrafeedback_binarized", "test")),
        ("org/name:train[:10%]", None, ("org/name", "train[:10%]")),
    ],
)
def test_hub_id_is_parsed_and_routed(monkeypatch, tmp_path, source, split, expected):
    monkeypatch.chdir(tmp_path)  # so no local file or directory shadows the id
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_records(source, split=split) == RECORDS
    assert calls == [expected]


def test_hub_failure_is_an_alignkit_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)

    def failing_load_dataset(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(
        AlignkitError, match=r"hub dataset 'org/data', split 'train': cannot load \(offline\)"
    ):
        load_records("org/data")


@pytest.mark.parametrize(
    "source", ["missing/train.jsonl", "data/dir/file.txt", "./nowhere", "a b c", "org/x:train[:10%"]
)
def test_source_that_is_neither_path_nor_hub_id(monkeypatch, tmp_path, source):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("must not reach the hub"))
    with pytest.raises(
        AlignkitError, match="neither an existing file or directory nor a hub dataset id"
    ) as info:
        load_records(source)
    assert repr(source) in str(info.value)


def test_empty_source():
    with pytest.raises(AlignkitError, match="no data source given"):
        load_records("  ")


def test_unsupported_suffix_and_empty_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(AlignkitError, match=r"unsupported file type '\.txt'"):
        load_records(str(text))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(AlignkitError, match=r"empty\.jsonl: contains no records"):
        load_records(str(empty))


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(AlignkitError, match=r"latin\.jsonl, line 1: not UTF-8 text"):
        load_records(str(path))


def test_split_records_is_deterministic_and_partitions():
    records = [{"i": i} for i in range(100)]
    train, evaluation = split_records(records, 0.1, seed=3)
    assert len(evaluation) == 10 and len(train) == 90
    assert sorted(r["i"] for r in train + evaluation) == list(range(100))
    assert [r["i"] for r in train] == sorted(r["i"] for r in train)  # original order kept
    assert split_records(records, 0.1, seed=3) == (train, evaluation)
    assert split_records(records, 0.1, seed=4)[1] != evaluation
    assert split_records(records, 0.0, seed=3) == (records, [])


def test_split_records_holds_out_at_least_one_and_checks_fraction():
    assert len(split_records([{"i": i} for i in range(10)], 0.02, seed=0)[1]) == 1
    with pytest.raises(AlignkitError, match="leaves none for training"):
        split_records([{"i": 0}], 0.5, seed=0)
    with pytest.raises(AlignkitError, match=r"expected a value in \[0, 1\), got 1.0"):
        split_records([{"i": 0}, {"i": 1}], 1.0, seed=0)


def test_module_imports_datasets_lazily():
    assert "datasets" not in vars(load_module)
