"""Data files as users keep them: JSON arrays, ShareGPT rows, parquet, `datasets` directories, and
what else a domain directory may hold. Every file is built in the test; parquet and `datasets` tests
skip only when pyarrow / datasets are not installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ideal.data.files import fingerprint
from ideal.data.mixture import Mixture
from ideal.data.mixture_io import load_training_set, write_mixture_dir
from ideal.data.rows import load_domains, read_file
from ideal.data.tokens import _domain_of
from ideal.errors import IdealError
from tests.helpers import write_jsonl

ALPACA = [
    {"instruction": "add", "input": "1 2", "output": "3"},
    {"instruction": "say hi", "output": "hi"},
]
MESSAGES = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
PROMPT_COMPLETION = [{"prompt": "2+2", "completion": "4", "answer": 4}]
SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "hello"},
            {"from": "gpt", "value": "hi"},
            {"from": "user", "value": "again"},
            {"from": "assistant", "value": "hi again"},
        ]
    },
    {
        "system": "be kind",
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
    },
]
SHAREGPT_MESSAGES = [
    (
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "hi again"},
    ),
    (
        {"role": "system", "content": "be kind"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ),
]


def write_json(path: Path, value: object, indent: int | None = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=indent), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def save_dataset(path: Path, rows: list[dict], splits: tuple[str, ...] = ()) -> Path:
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_list(rows)
    if splits:
        data = datasets.DatasetDict({split: data for split in splits})
    data.save_to_disk(str(path))
    return path


# ----------------------------------------------------------------------------- JSON arrays


@pytest.mark.parametrize(
    ("rows", "fmt"),
    [(ALPACA, "alpaca"), (MESSAGES, "messages"), (PROMPT_COMPLETION, "prompt_completion")],
)
def test_a_json_array_of_rows_is_read_with_row_indices(tmp_path, rows, fmt):
    path = write_json(tmp_path / "math" / "data.json", rows)
    domain = load_domains(tmp_path)["math"]
    assert (domain.formats, domain.kinds, domain.rows) == (
        {"data.json": fmt},
        {"data.json": "json"},
        {"data.json": len(rows)},
    )
    assert [e.source for e in domain.examples] == [f"{path}[{i}]" for i in range(len(rows))]
    # each row's JSON text is one line and holds the row as it is (mixtures write it back)
    assert [json.loads(e.raw) for e in domain.examples] == rows
    assert all("\n" not in e.raw for e in domain.examples)


def test_json_rows_convert_like_json_lines_rows(tmp_path):
    from_json = read_file(write_json(tmp_path / "a.json", ALPACA))[0]
    from_jsonl = read_file(write_jsonl(tmp_path / "a.jsonl", ALPACA))[0]
    assert [e.messages for e in from_json] == [e.messages for e in from_jsonl]
    assert from_json[0].messages == (
        {"role": "user", "content": "add\n\n1 2"},
        {"role": "assistant", "content": "3"},
    )


def test_a_json_file_of_one_object_per_line_is_read_as_json_lines(tmp_path):
    """`Dataset.to_json` writes JSON Lines under a .json name."""
    path = write_jsonl(tmp_path / "a.json", ALPACA)
    examples, fmt, _ = read_file(path)
    assert fmt == "alpaca" and [e.source for e in examples] == [f"{path}:1", f"{path}:2"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (
            '[{"prompt": "q", "completion": "a"},\n  {"prompt": "q" "completion"}]',
            ":2: invalid JSON",
        ),
        ("42", ": expected a JSON array of rows, got int"),
        ("[]", ": empty file (no rows)"),
        ('{\n  "ideal_math": {"file_name": "math.json"}\n}', ":1: unknown row format"),
        (
            '[{"prompt": "q", "completion": "a"}, ["q", "a"]]',
            "[1]: a row must be a JSON object, got list",
        ),
        (
            '[{"prompt": "q", "completion": "a"}, {"prompt": "q"}]',
            "[1]: missing field 'completion'",
        ),
        (
            '[{"instruction": "q", "input": null, "output": "a"}]',
            "[0]: field 'input' must be a string",
        ),
    ],
)
def test_bad_json_files_are_one_line_naming_file_and_row(tmp_path, text, needle):
    path = tmp_path / "a.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(IdealError) as err:
        read_file(path)
    assert str(err.value).startswith(f"{path}{needle}"), str(err.value)
    assert "\n" not in str(err.value)


def test_skip_mode_names_skipped_json_rows_by_index(tmp_path):
    path = write_json(tmp_path / "a.json", [ALPACA[0], {"instruction": "q"}, ALPACA[1]])
    examples, fmt, skipped = read_file(path, on_invalid="skip")
    assert fmt == "alpaca" and len(examples) == 2
    assert skipped == [f"{path}[1]: missing field 'output'"]


# ----------------------------------------------------------------------------- ShareGPT


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_sharegpt_rows_map_speakers_to_roles(tmp_path, suffix):
    path = tmp_path / "chat" / f"data{suffix}"
    write_jsonl(path, SHAREGPT) if suffix == ".jsonl" else write_json(path, SHAREGPT)
    domain = load_domains(tmp_path)["chat"]
    assert domain.formats == {path.name: "sharegpt"}
    assert [e.messages for e in domain.examples] == SHAREGPT_MESSAGES
    assert domain.examples[0].completion == "hi again"


@pytest.mark.parametrize(("suffix", "where"), [(".jsonl", ":2"), (".json", "[1]")])
def test_an_unknown_sharegpt_speaker_names_file_row_and_value(tmp_path, suffix, where):
    rows = [
        SHAREGPT[1],
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
    ]
    path = tmp_path / f"data{suffix}"
    write_jsonl(path, rows) if suffix == ".jsonl" else write_json(path, rows)
    with pytest.raises(IdealError) as err:
        read_file(path)
    assert str(err.value) == (
        f"{path}{where}: conversations[1].from must be one of human, gpt, system, user, "
        "assistant, got 'bot'"
    )


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"conversations": []}, "field 'conversations' must be a non-empty list"),
        ({"conversations": ["hi"]}, "conversations[0] must be an object, got str"),
        ({"conversations": [{"from": "human"}]}, "conversations[0]: missing field 'value'"),
        (
            {"conversations": [{"from": "gpt", "value": 3}]},
            "conversations[0]: field 'value' must be a string",
        ),
        ({"conversations": [{"from": "human", "value": "q"}]}, "the last turn must be from 'gpt'"),
        (
            {"system": 1, "conversations": [{"from": "gpt", "value": "a"}]},
            "field 'system' must be a string",
        ),
    ],
)
def test_invalid_sharegpt_rows_say_why(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(IdealError) as err:
        read_file(path)
    assert str(err.value).startswith(f"{path}:1: {reason}"), str(err.value)


# ----------------------------------------------------------------------------- parquet, datasets


def test_parquet_rows_drop_nulls_and_keep_their_index(tmp_path):
    rows = [
        {"instruction": "add", "input": "1 2", "output": "3", "answer": 3},
        {"instruction": "say hi", "input": None, "output": "hi", "answer": None},
    ]
    path = write_parquet(tmp_path / "math" / "part-0.parquet", rows)
    domain = load_domains(tmp_path)["math"]
    assert (domain.formats, domain.kinds) == ({path.name: "alpaca"}, {path.name: "parquet"})
    first, second = domain.examples
    assert (first.source, second.source) == (f"{path}[0]", f"{path}[1]")
    assert (first.answer, second.answer) == ("3", None)
    assert second.messages[0] == {"role": "user", "content": "say hi"}  # a null input is no input
    assert json.loads(second.raw) == {"instruction": "say hi", "output": "hi"}


def test_parquet_messages_and_bad_rows(tmp_path):
    path = write_parquet(
        tmp_path / "a.parquet", MESSAGES + [{"messages": [{"role": "bot", "content": "x"}]}]
    )
    with pytest.raises(IdealError, match=r"a\.parquet\[1\]: messages\[0\]\.role must be one of"):
        read_file(path)
    examples, fmt, skipped = read_file(path, on_invalid="skip")
    assert fmt == "messages" and examples[0].messages == tuple(MESSAGES[0]["messages"])
    assert len(skipped) == 1 and skipped[0].startswith(f"{path}[1]: ")


def test_a_file_that_is_not_parquet_is_one_line(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "a.parquet"
    path.write_text("not parquet")
    with pytest.raises(IdealError, match=r"a\.parquet: cannot read as parquet \("):
        read_file(path)


def test_a_datasets_directory_is_a_data_file_of_its_domain(tmp_path):
    # Dataset.from_list takes its columns from the first row: the row with a system prompt first
    rows, messages = SHAREGPT[::-1], SHAREGPT_MESSAGES[::-1]
    path = save_dataset(tmp_path / "chat" / "sharegpt-part", rows)
    domain = load_domains(tmp_path)["chat"]
    assert (domain.files, domain.formats, domain.kinds) == (
        [path],
        {"sharegpt-part": "sharegpt"},
        {"sharegpt-part": "datasets"},
    )
    assert [e.messages for e in domain.examples] == messages
    assert [e.source for e in domain.examples] == [f"{path}[0]", f"{path}[1]"]
    assert [json.loads(e.raw) for e in domain.examples] == rows  # the null 'system' is dropped
    assert _domain_of(domain.examples[1].source) == "chat"


def test_a_datasets_dict_of_one_split_is_read_and_of_several_is_an_error(tmp_path):
    one = save_dataset(tmp_path / "one", ALPACA, splits=("train",))
    examples, fmt, _ = read_file(one)
    assert fmt == "alpaca" and len(examples) == 2
    two = save_dataset(tmp_path / "two", ALPACA, splits=("train", "test"))
    with pytest.raises(
        IdealError, match=r"two: a DatasetDict of splits train, test; a domain reads one"
    ):
        read_file(two)


def test_a_domain_that_is_itself_a_datasets_directory_says_where_it_belongs(tmp_path):
    save_dataset(tmp_path / "math", ALPACA)
    with pytest.raises(
        IdealError, match=r"math: a `datasets` directory .* move it to .*math/<name>/"
    ):
        load_domains(tmp_path)


def test_missing_optional_readers_are_one_line_with_the_install_command(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    for module in ("pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(IdealError) as err:
        read_file(tmp_path / "a.parquet")
    assert (
        str(err.value)
        == f"{tmp_path / 'a.parquet'}: reading parquet needs pyarrow: pip install 'ideal-mix[formats]'"
    )
    with pytest.raises(IdealError) as err:
        read_file(tmp_path / "ds")
    assert str(err.value) == (
        f"{tmp_path / 'ds'}: reading a `datasets` directory needs the datasets package: "
        "pip install 'ideal-mix[formats]'"
    )


# ----------------------------------------------------------------------------- what a domain holds


@pytest.mark.parametrize("name", ["notes.txt", "data.csv", "train.tsv", "readme_rows.jsonx"])
def test_a_file_of_another_kind_is_an_error_naming_it(tmp_path, name):
    write_jsonl(tmp_path / "math" / "a.jsonl", PROMPT_COMPLETION)
    (tmp_path / "math" / name).write_text("x")
    with pytest.raises(IdealError) as err:
        load_domains(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'math' / name}: not a data file (expected ")


def test_dotfiles_are_skipped_documentation_and_another_directory_are_errors(tmp_path):
    write_jsonl(tmp_path / "math" / "a.jsonl", PROMPT_COMPLETION)
    (tmp_path / "math" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "math" / ".cache").mkdir()
    assert load_domains(tmp_path)["math"].formats == {"a.jsonl": "prompt_completion"}
    for name in ("README.md", "LICENSE"):  # never skipped: a file of another kind is an error
        (tmp_path / "math" / name).write_text("# a dataset card")
        with pytest.raises(IdealError, match=f"math/{name}: not a data file"):
            load_domains(tmp_path)
        (tmp_path / "math" / name).unlink()
    (tmp_path / "math" / "old").mkdir()
    with pytest.raises(
        IdealError, match=r"math/old: a directory that is not a `datasets` directory"
    ):
        load_domains(tmp_path)


def test_a_domain_of_only_dotfiles_is_empty(tmp_path):
    (tmp_path / "math").mkdir()
    (tmp_path / "math" / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(IdealError, match=r"math: empty domain \(no data files"):
        load_domains(tmp_path)


def test_mixed_kinds_and_formats_in_one_domain_and_a_mixture_over_them(tmp_path):
    pytest.importorskip("pyarrow")
    pytest.importorskip("datasets")
    pool = tmp_path / "train"
    write_jsonl(pool / "mix" / "a.jsonl", PROMPT_COMPLETION)
    write_json(pool / "mix" / "b.json", ALPACA)
    write_parquet(pool / "mix" / "c.parquet", MESSAGES)
    save_dataset(pool / "mix" / "d", SHAREGPT)
    write_jsonl(pool / "other" / "x.jsonl", PROMPT_COMPLETION)
    domain = load_domains(pool)["mix"]
    assert domain.formats == {
        "a.jsonl": "prompt_completion",
        "b.json": "alpaca",
        "c.parquet": "messages",
        "d": "sharegpt",
    }
    assert domain.kinds == {
        "a.jsonl": "jsonl",
        "b.json": "json",
        "c.parquet": "parquet",
        "d": "datasets",
    }
    assert domain.rows == {"a.jsonl": 1, "b.json": 2, "c.parquet": 1, "d": 2}
    assert len(domain.examples) == 6 and len({e.source for e in domain.examples}) == 6

    # a mixture over the pool: the datasets directory is hashed as a whole, rows written back as JSON
    training = load_training_set(pool)
    assert training.files["mix/d"] == fingerprint(pool / "mix" / "d")
    mixture = Mixture({"mix": np.array([2, 1, 0, 1, 1, 0]), "other": np.array([1])})
    write_mixture_dir(tmp_path / "round-1", training, mixture)
    lines = (tmp_path / "round-1" / "mix" / "data.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [PROMPT_COMPLETION[0]] * 2 + [
        ALPACA[0],
        MESSAGES[0],
        SHAREGPT[0],
    ]
    again = load_training_set(tmp_path / "round-1")
    assert {d: c.tolist() for d, c in again.mixture.counts.items()} == {
        "mix": [2, 1, 0, 1, 1, 0],
        "other": [1],
    }
    # a changed datasets directory is a changed pool
    save_dataset(pool / "mix" / "d", SHAREGPT[:1])
    with pytest.raises(IdealError, match=r"the pool .* changed since this mixture was written"):
        load_training_set(tmp_path / "round-1")


@pytest.mark.parametrize(
    ("source", "domain"),
    [
        ("t/math/a.jsonl:3", "math"),
        ("t/math/a.json[12]", "math"),
        ("t/math/ds[0]", "math"),
        ("x:1", ""),
    ],
)
def test_the_domain_of_a_row_is_its_files_directory(source, domain):
    assert _domain_of(source) == domain
