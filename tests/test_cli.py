"""The command line: help texts, `ideal reweight` end to end, one-line errors for bad input."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from ideal.artifacts import atomic_write_json
from ideal.data.mixture_io import load_training_set
from ideal.errors import WriteError
from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm
from tests.helpers import make_data_dir, qa_rows, write_jsonl

COMMANDS = ["demo", "train", "eval", "influence", "reweight", "check"]


def write_influence(path: Path, sensitivity: dict[str, float], volumes: dict[str, int]) -> Path:
    domains = sorted(sensitivity)
    path.write_text(
        json.dumps({"domains": domains, "sensitivity": sensitivity, "volumes": volumes})
    )
    return path


def assert_one_line_error(result, *needles: str) -> None:
    assert result.code != 0
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("ideal: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_of_every_command(cli):
    top = cli("--help")
    assert top.code == 0
    for command in COMMANDS:
        assert command in top.out
        result = cli(command, "--help")
        assert result.code == 0 and "Usage" in result.out


@pytest.fixture
def train_dir(tmp_path):
    return make_data_dir(tmp_path / "train", {"math": qa_rows("m", 40), "code": qa_rows("c", 30)})


def test_reweight_end_to_end(cli, tmp_path, train_dir):
    influence = write_influence(
        tmp_path / "inf.json", {"math": -2.0, "code": 1.0}, {"math": 40, "code": 30}
    )
    result = cli(
        "reweight", "--train", train_dir, "--influence", influence, "--out", tmp_path / "r1",
        "--no-keep-total",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "wrote" in result.out
    manifest = json.loads((tmp_path / "r1" / "mixture.json").read_text())
    # beta = -0.15 * alpha / max|alpha| = [+0.15, -0.075]: 46 and 27.75 -> 28
    assert {d: e["volume"] for d, e in manifest["domains"].items()} == {"code": 28, "math": 46}
    assert (
        manifest["domains"]["math"]["unique"] == 40
        and manifest["domains"]["math"]["max_repeats"] == 2
    )
    assert manifest["update"]["beta"] == pytest.approx({"code": -0.075, "math": 0.15})
    assert set(manifest["pool"]["files"]) == {"code/data.jsonl", "math/data.jsonl"}
    lines = (tmp_path / "r1" / "math" / "data.jsonl").read_text().splitlines()
    assert len(lines) == 46 and len(set(lines)) == 40

    # round 2 reads round 1's directory, goes back to the pool, and keeps going incrementally
    influence2 = write_influence(
        tmp_path / "inf2.json", {"math": 1.0, "code": -1.0}, {"math": 46, "code": 28}
    )
    result = cli(
        "reweight",
        "--train",
        tmp_path / "r1",
        "--influence",
        influence2,
        "--out",
        tmp_path / "r2",
        "--keep-total",
    )
    assert result.code == 0, result.err
    r1, r2 = load_training_set(tmp_path / "r1"), load_training_set(tmp_path / "r2")
    assert r2.mixture.round == 2 and r2.mixture.total == 74
    assert (r2.mixture.counts["math"] <= r1.mixture.counts["math"]).all()
    assert (r2.mixture.counts["code"] >= r1.mixture.counts["code"]).all()

    # same inputs, same seed: byte-identical output
    again = cli(
        "reweight", "--train", train_dir, "--influence", influence, "--out", tmp_path / "r1b",
        "--no-keep-total",
    )  # fmt: skip
    assert again.code == 0
    for name in ("math/data.jsonl", "code/data.jsonl"):
        assert (tmp_path / "r1" / name).read_bytes() == (tmp_path / "r1b" / name).read_bytes()


def test_reweight_additive_geometry(cli, tmp_path, train_dir):
    influence = write_influence(
        tmp_path / "inf.json", {"math": -2.0, "code": 1.0}, {"math": 40, "code": 30}
    )
    args = ["reweight", "--train", train_dir, "--influence", influence, "--keep-total"]
    result = cli(*args, "--out", tmp_path / "r1", "--geometry", "additive")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "r1" / "mixture.json").read_text())
    # g = alpha/n = [-0.05, +0.0333], centred [-0.0417, +0.0417]; dn = -0.15 x 35 x g/0.0417 =
    # [+5.25, -5.25]; code may lose at most 15 %: 25.5; total 70.75 -> 70 by scaling then
    # largest remainder: 44.77 + 25.23 -> 45 + 25
    assert manifest["update"]["requested"] == pytest.approx({"math": 45.25, "code": 25.5})
    assert {d: e["volume"] for d, e in manifest["domains"].items()} == {"code": 25, "math": 45}
    assert manifest["update"]["geometry"] == "additive"
    # the gradient in volumes needs the size factor in the sensitivities
    document = json.loads(influence.read_text())
    document["objective"] = {"size_factor": False}
    influence.write_text(json.dumps(document))
    assert_one_line_error(
        cli(*args, "--out", tmp_path / "r2", "--geometry", "additive"), "size factor"
    )
    assert not (tmp_path / "r2" / "mixture.json").exists()
    assert cli(*args, "--out", tmp_path / "r3", "--geometry", "log").code == 2  # a usage error


def test_reweight_respects_max_repeats(cli, tmp_path):
    train = make_data_dir(tmp_path / "t", {"a": qa_rows("a", 10), "b": qa_rows("b", 10)})
    influence = write_influence(tmp_path / "i.json", {"a": -1.0, "b": 0.5}, {"a": 10, "b": 10})
    result = cli("reweight", "--train", train, "--influence", influence, "--out", tmp_path / "o",
                 "--step", "0.9", "--max-repeats", "1", "--no-keep-total")  # fmt: skip
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "o" / "mixture.json").read_text())
    assert manifest["domains"]["a"]["volume"] == 10  # wanted 19, capped at 1 x 10
    assert manifest["constraints_applied"][0]["constraint"] == "max_repeats"
    assert "max_repeats" in result.out


def test_stale_influence_is_an_error(cli, tmp_path, train_dir):
    influence = write_influence(
        tmp_path / "i.json", {"math": 1.0, "code": 1.0}, {"math": 41, "code": 30}
    )
    out = tmp_path / "o"
    assert_one_line_error(
        cli("reweight", "--train", train_dir, "--influence", influence, "--out", out), "stale"
    )
    assert not out.exists()


def test_existing_output_is_not_overwritten(cli, tmp_path, train_dir):
    influence = write_influence(
        tmp_path / "i.json", {"math": 1.0, "code": 1.0}, {"math": 40, "code": 30}
    )
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    result = cli(
        "reweight", "--train", train_dir, "--influence", influence, "--out", tmp_path / "o"
    )
    assert_one_line_error(result, "not empty")
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_skipped_rows_are_counted_in_the_manifest(cli, tmp_path):
    train = make_data_dir(
        tmp_path / "t", {"a": [*qa_rows("a", 5), "{bad", {"prompt": "x"}], "b": qa_rows("b", 5)}
    )
    influence = write_influence(tmp_path / "i.json", {"a": 1.0, "b": -1.0}, {"a": 5, "b": 5})
    args = ["reweight", "--train", train, "--influence", influence, "--out", tmp_path / "o"]
    assert_one_line_error(cli(*args), "a/data.jsonl:6: invalid JSON")
    result = cli(*args, "--on-invalid", "skip")
    assert result.code == 0, result.err
    pool = json.loads((tmp_path / "o" / "mixture.json").read_text())["pool"]
    assert pool["skipped_rows"] == 2
    assert pool["skipped"][1].endswith("data.jsonl:7: missing field 'completion'")


GOOD = {"prompt": "q", "completion": "a"}


@pytest.mark.parametrize(
    ("layout", "needles"),
    [
        ({"a/x.jsonl": [GOOD, '{"prompt": "q", ']}, ["a/x.jsonl:2: invalid JSON"]),
        ({"a/x.jsonl": [GOOD, {"prompt": "q"}]}, ["a/x.jsonl:2: missing field 'completion'"]),
        (
            {"a/x.jsonl": [{"prompt": "q", "completion": 3}]},
            ["a/x.jsonl:1: field 'completion' must be a string, got int"],
        ),
        ({"a/x.jsonl": []}, ["a/x.jsonl: empty file"]),
        ({"a/x.jsonl": [GOOD], "b/notes.txt": None}, ["b/notes.txt: not a data file"]),
        ({"a/x.jsonl": [{"question": "q", "reply": "a"}]}, ["a/x.jsonl:1: unknown row format"]),
        ({"math/x.jsonl": [GOOD], "Math/x.jsonl": [GOOD]}, ["duplicate domain name"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(cli, tmp_path, layout, needles):
    root = tmp_path / "train"
    for name, rows in layout.items():
        if rows is None:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("not data")
        else:
            write_jsonl(root / name, rows)
    influence = write_influence(tmp_path / "i.json", {"a": 1.0}, {"a": 1})
    out = tmp_path / "out"
    assert_one_line_error(
        cli("reweight", "--train", root, "--influence", influence, "--out", out), *needles
    )
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = char_tokenizer()
    path = tmp_path_factory.mktemp("model")
    return save_model_dir(path, tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer)


def test_check_reports_formats_tokens_and_truncation(cli, tmp_path, model_dir):
    train = make_data_dir(tmp_path / "t", {"math": qa_rows("what is", 3)})
    write_jsonl(train / "math" / "b.jsonl", [{"instruction": "sum", "input": "1 2", "output": "3"}])
    result = cli("check", train, "--model", model_dir, "--max-length", "8")
    assert result.code == 0, result.err
    row = next(line for line in result.out.splitlines() if "math" in line)
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    # 4 rows, each cut to 8 tokens with its 2 target tokens (answer digit + EOS) kept
    # ... and none re-tokenized (one token per character: nothing merges across the boundary)
    assert cells == ["math", "2", "alpaca, prompt_completion", "4", "4", "0", "32", "8", "4", "0",
                     "0"]  # fmt: skip


def test_no_target_after_truncation_is_one_line(cli, tmp_path, model_dir):
    train = make_data_dir(tmp_path / "t", {"math": qa_rows("what is", 3)})
    result = cli("check", train, "--model", model_dir, "--max-length", "1")
    assert_one_line_error(
        result, "math/data.jsonl:1: no target tokens after truncation to max_length=1"
    )


def test_missing_model_is_one_line(cli, tmp_path):
    train = make_data_dir(tmp_path / "t", {"math": qa_rows("q", 3)})
    assert_one_line_error(
        cli("check", train, "--model", tmp_path / "nope"), "model directory not found"
    )


def test_model_directory_without_config_json_is_one_line(cli, tmp_path, model_dir):
    train = make_data_dir(tmp_path / "t", {"math": qa_rows("q", 3)})
    broken = tmp_path / "tokenizer-only"
    char_tokenizer().save_pretrained(broken)  # a tokenizer but no config.json (no model)
    assert_one_line_error(
        cli("check", train, "--model", broken), f"{broken}: not a Hugging Face model directory"
    )
    assert_one_line_error(cli("eval", "--model", broken, "--data", train), "(no config.json)")


def test_tokenizer_without_chat_template_and_eos_is_one_line(cli, tmp_path):
    tokenizer = char_tokenizer(chat_template=False)
    tokenizer.eos_token = None  # the plain template ends answers with EOS: there is none
    path = save_model_dir(
        tmp_path / "m", tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer
    )
    train = make_data_dir(tmp_path / "t", {"math": qa_rows("q", 3)})
    assert_one_line_error(cli("check", train, "--model", path), f"{path}: the tokenizer has no EOS")
    out = tmp_path / "out"
    result = cli("train", "--model", path, "--train", train, "--out", out, "--max-steps", "1")
    assert_one_line_error(result, "no EOS token")
    assert not out.exists() and not out.with_name("out.partial").exists()


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["fsync", "write_text"])
def test_a_full_disk_is_one_line_and_writes_nothing(cli, tmp_path, train_dir, monkeypatch, where):
    influence = write_influence(
        tmp_path / "inf.json", {"math": -2.0, "code": 1.0}, {"math": 40, "code": 30}
    )
    out = tmp_path / "r1"
    # the manifest's atomic write (fsync) or the rows inside the atomic directory (write_text)
    monkeypatch.setattr(*((os, "fsync") if where == "fsync" else (Path, "write_text")), disk_full)
    result = cli("reweight", "--train", train_dir, "--influence", influence, "--out", out)
    named = out / "mixture.json" if where == "fsync" else out
    assert_one_line_error(result, f"{named}: cannot write (No space left on device)")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inf.json", "train"]  # no temp files


def test_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"rounds": 1})
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(WriteError, match="No space left on device"):
        atomic_write_json(path, {"rounds": 2})
    assert json.loads(path.read_text()) == {"rounds": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_ctrl_c_is_one_line_and_leaves_no_output(cli, tmp_path, train_dir, monkeypatch):
    influence = write_influence(
        tmp_path / "inf.json", {"math": -2.0, "code": 1.0}, {"math": 40, "code": 30}
    )

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", interrupted)  # Ctrl-C while the rows are written
    result = cli(
        "reweight", "--train", train_dir, "--influence", influence, "--out", tmp_path / "o"
    )
    assert (result.code, result.out, result.err) == (130, "", "ideal: interrupted\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inf.json", "train"]
