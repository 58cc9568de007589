"""`ideal compare`: methods side by side on the quick demo config, sharing round 0."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest


@pytest.mark.slow
def test_compare_uniform_and_ideal_on_the_quick_config(cli, tmp_path):
    config = str(files("ideal") / "configs" / "demo-quick.yaml")
    result = cli(
        "compare", config, "--methods", "uniform,ideal", "--seeds", "1", "--out", tmp_path / "c"
    )
    assert result.code == 0, result.err
    assert "uniform" in result.out and "ideal" in result.out
    document = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert list(document["methods"]) == ["uniform", "ideal"] and document["seeds"] == [0]
    uniform, ideal = (tmp_path / "c" / m / "seed-0" for m in ("uniform", "ideal"))
    # one update to equal volumes at the same total
    volumes = json.loads((uniform / "round-1" / "mixture.json").read_text())["domains"]
    assert sorted(e["volume"] for e in volumes.values()) == [120] * 5
    assert not (uniform / "round-0" / "influence.json").exists()
    # round 0 is trained once and shared
    a, b = (p / "round-0" / "model" / "model.safetensors" for p in (uniform, ideal))
    assert a.read_bytes() == b.read_bytes()
    assert (ideal / "round-0" / "influence.json").is_file() and (ideal / "report.html").is_file()
    entry = document["methods"]["ideal"]
    assert (
        entry["runs"][0]["final"]["round"] == 1 and entry["test_accuracy_mean"]["mean"] is not None
    )


def test_unknown_method_is_one_line(cli, tmp_path):
    config = str(files("ideal") / "configs" / "demo-quick.yaml")
    result = cli(
        "compare", config, "--methods", "uniform,doremi", "--seeds", "1", "--out", tmp_path / "c"
    )
    assert result.code == 1 and "unknown 'doremi'" in result.err and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_random_keeps_the_candidate_with_the_best_reference_loss(cli, tmp_path):
    config = str(files("ideal") / "configs" / "demo-quick.yaml")
    result = cli("compare", config, "--methods", "random,original", "--seeds", "1", "--random-candidates", "2",
                 "--out", tmp_path / "c")  # fmt: skip
    assert result.code == 0, result.err
    document = json.loads((tmp_path / "c" / "compare.json").read_text())
    entry = document["methods"]["random"]["runs"][0]
    losses, totals = [], []
    for k in range(2):
        candidate = tmp_path / "c" / "random" / "seed-0" / f"candidate-{k}"
        summary = json.loads((candidate / "summary.json").read_text())
        losses.append(summary["rounds"][-1]["reference_loss_mean"])
        totals.append(sum(summary["rounds"][-1]["volumes"].values()))
    assert totals == [600, 600]  # the same budget as D0
    assert entry["candidate"] == losses.index(min(losses))
    assert abs(sum(entry["shares"].values()) - 1.0) < 1e-9
    # original shares round 0 with random's first candidate
    a = (
        tmp_path
        / "c"
        / "random"
        / "seed-0"
        / "candidate-0"
        / "round-0"
        / "model"
        / "model.safetensors"
    )
    b = tmp_path / "c" / "original" / "seed-0" / "round-0" / "model" / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()
