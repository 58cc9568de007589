"""`ideal compare`: methods side by side on the quick demo config, sharing round 0."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest

from ideal.errors import IdealError


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
        "compare", config, "--methods", "uniform,doremy", "--seeds", "1", "--out", tmp_path / "c"
    )
    assert result.code == 1 and "unknown 'doremy'" in result.err and not (tmp_path / "c").exists()


def test_grid_shares_enumerate_the_positive_lattice():
    from ideal.compare import grid_shares

    points = grid_shares(["a", "b", "c"], 5)
    # compositions of 5 into 3 positive parts: C(4, 2) = 6
    assert len(points) == 6
    assert {tuple(round(5 * p[d]) for d in "abc") for p in points} == {
        (3, 1, 1), (1, 3, 1), (1, 1, 3), (2, 2, 1), (2, 1, 2), (1, 2, 2)
    }  # fmt: skip
    assert all(abs(sum(p.values()) - 1) < 1e-12 for p in points)
    assert len(grid_shares(["a", "b", "c", "d", "e"], 7)) == 15
    with pytest.raises(IdealError, match="grid-resolution"):
        grid_shares(["a", "b", "c"], 2)


def test_gap_closure_by_hand():
    from ideal.compare import gap_closure

    def method(*accuracies):
        return {
            "runs": [
                {"seed": s, "final": {"test_accuracy_mean": a}} for s, a in enumerate(accuracies)
            ]
        }

    results = {
        "original": method(0.2, 0.4),  # mean 0.3
        "oracle-grid": method(0.5, 0.7),  # mean 0.6
        "ideal": method(0.4, 0.5),  # mean 0.45: half of the gap
        "uniform": method(0.1, 0.3),  # mean 0.2: negative
    }
    closure = gap_closure(results)
    assert closure["ideal"]["closure"] == pytest.approx(0.5)
    assert closure["uniform"]["closure"] == pytest.approx(-1 / 3)
    assert closure["ideal"]["oracle_minus_original"] == pytest.approx(0.3)
    assert gap_closure({"original": method(0.2)}) is None


@pytest.mark.slow
def test_doremi_doge_and_oracle_grid_on_the_quick_config(cli, tmp_path):
    config = str(files("ideal") / "configs" / "demo-quick.yaml")
    out = tmp_path / "c"
    result = cli("compare", config, "--methods", "original,doremi,doge,oracle-grid", "--seeds", "1",
                 "--grid-resolution", "6", "--out", out, "update.proxy_steps=60")  # fmt: skip
    assert result.code == 0, result.err
    document = json.loads((out / "compare.json").read_text())
    for method in ("doremi", "doge"):
        run = out / method / "seed-0"
        proxy = json.loads((run / "round-0" / "proxy.json").read_text())
        weights = proxy["weights"]
        assert proxy["method"] == method and abs(sum(weights.values()) - 1) < 1e-9
        assert (run / "round-0" / "proxy.png").is_file()
        volumes = json.loads((run / "round-1" / "mixture.json").read_text())["domains"]
        assert sum(e["volume"] for e in volumes.values()) == 600  # the same budget as D0
        heaviest = max(weights, key=weights.get)  # volumes follow the learned weights
        assert max(volumes, key=lambda d: volumes[d]["volume"]) == heaviest
        seconds = json.loads((run / "summary.json").read_text())["rounds"][0]["seconds"]
        assert seconds["proxy"] > 0  # the proxy run's cost is counted
    # oracle grid: uniform + 5 lattice points k/6 (one domain at 2/6), the best by TEST accuracy
    oracle = document["methods"]["oracle-grid"]["runs"][0]
    assert len(oracle["grid"]) == 6
    best = max([r["test_accuracy_mean"] for r in oracle["grid"]]
               + [document["methods"]["original"]["runs"][0]["final"]["test_accuracy_mean"]])  # fmt: skip
    assert oracle["final"]["test_accuracy_mean"] == pytest.approx(best)
    closure = document["gap_closure"]
    assert set(closure) == {"doremi", "doge"}
    html = (out / "compare.html").read_text()
    assert "gap closure" in html and "oracle-grid" in html and (out / "compare.png").is_file()


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
