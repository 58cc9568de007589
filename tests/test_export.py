"""`ideal export`: each tool's files parse as that tool documents, with the mixture's exact volumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ideal.data.mixture import draw_mixture
from ideal.data.mixture_io import load_training_set, write_mixture_dir
from tests.helpers import make_data_dir, qa_rows
from tests.test_cli import assert_one_line_error, write_influence


@pytest.fixture
def mixture(cli, tmp_path):
    train = make_data_dir(tmp_path / "train", {"math": qa_rows("m", 10), "code": qa_rows("c", 6)})
    influence = write_influence(
        tmp_path / "i.json", {"math": -1.0, "code": 0.5}, {"math": 10, "code": 6}
    )
    assert (
        cli(
            "reweight",
            "--train",
            train,
            "--influence",
            influence,
            "--out",
            tmp_path / "mix",
            "--step",
            "0.5",
            "--no-keep-total",
        ).code
        == 0
    )
    manifest = json.loads((tmp_path / "mix" / "mixture.json").read_text())
    return tmp_path / "mix" / "mixture.json", {
        d: e["volume"] for d, e in manifest["domains"].items()
    }


def count_rows(path) -> int:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(r) == {"messages"} and r["messages"][-1]["role"] == "assistant" for r in rows)
    return len(rows)


def test_llamafactory(cli, tmp_path, mixture):
    path, volumes = mixture
    assert volumes == {"code": 5, "math": 15}  # 6 x (1 - 0.25) = 4.5 rounds half up; 10 x 1.5
    assert (
        cli("export", "--mixture", path, "--format", "llamafactory", "--out", tmp_path / "lf").code
        == 0
    )
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())
    assert set(info) == {"ideal_math", "ideal_code"}
    for domain, volume in volumes.items():
        entry = info[f"ideal_{domain}"]
        assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "messages"}
        assert entry["tags"]["role_tag"] == "role" and entry["tags"]["assistant_tag"] == "assistant"
        assert count_rows(tmp_path / "lf" / entry["file_name"]) == volume


def test_trl(cli, tmp_path, mixture):
    path, volumes = mixture
    assert cli("export", "--mixture", path, "--format", "trl", "--out", tmp_path / "trl").code == 0
    config = yaml.safe_load((tmp_path / "trl" / "mixture.yaml").read_text())
    files = {entry["data_files"]: entry for entry in config["datasets"]}
    assert all(e["path"] == "json" and e["split"] == "train" for e in files.values())
    assert all(not Path(f).is_absolute() for f in files)  # relative to the export directory
    from ideal.data.export import export_mixture

    export_mixture(path, "trl", tmp_path / "abs", absolute=True)  # the loop's, for a command
    entries = yaml.safe_load((tmp_path / "abs" / "mixture.yaml").read_text())["datasets"]
    assert all(Path(e["data_files"]).is_file() for e in entries)
    assert sorted(count_rows(tmp_path / "trl" / f) for f in files) == sorted(volumes.values())


def test_axolotl(cli, tmp_path, mixture):
    path, volumes = mixture
    assert (
        cli("export", "--mixture", path, "--format", "axolotl", "--out", tmp_path / "ax").code == 0
    )
    config = yaml.safe_load((tmp_path / "ax" / "datasets.yaml").read_text())
    assert all(
        e["type"] == "chat_template" and e["field_messages"] == "messages"
        for e in config["datasets"]
    )
    assert all(not Path(e["path"]).is_absolute() for e in config["datasets"])
    total = sum(count_rows(tmp_path / "ax" / e["path"]) for e in config["datasets"])
    assert total == sum(volumes.values())


def test_export_errors(cli, tmp_path):
    assert_one_line_error(
        cli("export", "--mixture", tmp_path / "x.json", "--format", "trl", "--out", tmp_path / "o"),
        "expected a mixture.json",
    )
    assert not (tmp_path / "o").exists()


def test_export_a_run_or_a_round(cli, tmp_path):
    """`--run RUN` exports the round the run returned; `--run RUN/round-K` that round."""
    run = tmp_path / "run"
    for k, volumes in enumerate([{"math": 4, "code": 2}, {"math": 3, "code": 3}]):
        train = make_data_dir(
            tmp_path / f"pool-{k}", {"math": qa_rows("m", 4), "code": qa_rows("c", 3)}
        )
        assert cli("check", train).code == 0
        training = load_training_set(train)
        sizes = {d: len(p.examples) for d, p in training.pool.items()}
        write_mixture_dir(run / f"round-{k}", training, draw_mixture(sizes, volumes, 4, 0),
                          data_subdir="data")  # fmt: skip
        metrics = {"capabilities": {}, "test_accuracy_mean": None, "test_accuracy_worst": None,
                   "reference_loss_mean": 1.0 - 0.5 * k, "seconds": 1.0}  # fmt: skip
        (run / f"round-{k}" / "metrics.json").write_text(json.dumps(metrics))
        (run / f"round-{k}" / "model").mkdir()
        (run / f"round-{k}" / "model" / "train_settings.json").write_text("{}")
    # the returned round comes from the rounds (lowest mean reference loss), not from this file
    (run / "summary.json").write_text(json.dumps({"rounds": [], "selected_round": 0}))
    result = cli("export", "--run", run, "--format", "trl", "--out", tmp_path / "a")
    assert result.code == 0, result.err
    assert "round-1" in result.out
    assert sorted(count_rows(p) for p in (tmp_path / "a").glob("*.jsonl")) == [3, 3]
    result = cli("export", "--run", run / "round-0", "--format", "trl", "--out", tmp_path / "b")
    assert result.code == 0 and sorted(count_rows(p) for p in (tmp_path / "b").glob("*.jsonl")) == [
        2,
        4,
    ]
    assert_one_line_error(
        cli("export", "--run", tmp_path, "--format", "trl", "--out", tmp_path / "c"),
        "neither a finished run",
    )
    both = cli("export", "--run", run, "--mixture", run / "round-0" / "mixture.json",
               "--format", "trl", "--out", tmp_path / "d")  # fmt: skip
    assert both.code == 2 and "exactly one of --run and --mixture" in both.err
