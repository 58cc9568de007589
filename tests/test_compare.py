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
    # the round `select` returns (default: the lowest mean reference loss), round 0 included
    rounds = json.loads((ideal / "summary.json").read_text())["rounds"]
    losses = [r["reference_loss_mean"] for r in rounds]
    assert len(rounds) == 2 and entry["runs"][0]["selected"]["round"] == losses.index(min(losses))
    assert entry["runs"][0]["selected_round"] == entry["runs"][0]["selected"]["round"]
    assert entry["test_accuracy_mean"]["mean"] is not None
    # one seed: the paired difference is printed, but nothing separates the methods
    assert "paired differences against uniform" in result.out
    paired = document["paired"]["uniform"]["ideal"]["test_accuracy_mean"]
    assert paired["verdict"] == "not separable" and paired["stderr"] is None
    assert "Against uniform" in (tmp_path / "c" / "compare.html").read_text()


def test_unknown_method_is_one_line(cli, tmp_path):
    config = str(files("ideal") / "configs" / "demo-quick.yaml")
    result = cli(
        "compare", config, "--methods", "uniform,doremy", "--seeds", "1", "--out", tmp_path / "c"
    )
    assert result.code == 1 and "unknown 'doremy'" in result.err and not (tmp_path / "c").exists()


def test_every_method_makes_a_valid_config():
    from ideal.run.compare import METHODS, method_config
    from ideal.run.config import load_config

    config = load_config(files("ideal") / "configs" / "demo-quick.yaml")
    made = {m: method_config(config, m, seed=3) for m in METHODS}  # each validated on creation
    assert all(c.seed == 3 and c.train.seed == 3 for c in made.values())
    both = made["ideal-unseen-additive-trust"]
    assert (both.update.geometry, both.update.trust_region) == ("additive", True)
    assert both.influence.domain_rows == "unseen" and both.select == config.select
    assert made["ideal"].update.geometry == "relative" and made["uniform"].select == "last"
    assert made["ideal"].update.first_round == "uniform"  # the config's default: the probe
    assert made["ideal-no-probe"].update.first_round == "ideal"
    assert (made["ideal"].update.ties, made["ideal-smaller"].update.ties) == ("lowest", "smaller")
    assert made["ideal-lowest"].update == made["ideal"].update
    assert made["ideal-lowest"].update.candidates == made["ideal"].update.candidates


def test_grid_shares_enumerate_the_positive_lattice():
    from ideal.run.cells import grid_shares

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
    from ideal.run.compare import gap_closure

    def method(*accuracies):
        return {
            "runs": [
                {"seed": s, "selected": {"test_accuracy_mean": a}} for s, a in enumerate(accuracies)
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


def test_paired_differences_and_verdicts_by_hand():
    from ideal.paired import paired_differences, verdict

    def method(mean, worst):
        return {"runs": [{"seed": s, "selected": {"test_accuracy_mean": m, "test_accuracy_worst": w}}
                         for s, (m, w) in enumerate(zip(mean, worst, strict=True))]}  # fmt: skip

    results = {
        "original": method([0.30, 0.20, 0.40], [0.1, 0.0, 0.2]),
        # +0.05, +0.06, +0.04 every seed: mean 0.05, sd 0.01, stderr 0.01/sqrt(3)
        "ideal": method([0.35, 0.26, 0.44], [0.1, 0.0, 0.2]),
        # +0.10, -0.10, +0.02: mean 0.0067 with sd 0.1: not separable
        "noisy": method([0.40, 0.10, 0.42], [0.0, 0.1, 0.2]),
        "bad": method([0.20, 0.11, 0.29], [0.0, 0.0, 0.1]),
    }
    paired = paired_differences(results, "original")
    ideal = paired["ideal"]["test_accuracy_mean"]
    assert ideal["per_seed"] == pytest.approx([0.05, 0.06, 0.04])
    assert ideal["mean"] == pytest.approx(0.05) and ideal["sd"] == pytest.approx(0.01)
    assert ideal["stderr"] == pytest.approx(0.01 / 3**0.5) and ideal["verdict"] == "better"
    assert paired["ideal"]["test_accuracy_worst"]["verdict"] == "not separable"  # all zero
    assert paired["noisy"]["test_accuracy_mean"]["verdict"] == "not separable"
    assert paired["bad"]["test_accuracy_mean"]["verdict"] == "worse"
    assert "original" not in paired
    assert verdict(0.1, None) == "not separable"  # one seed: no error, no verdict


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
               + [document["methods"]["original"]["runs"][0]["selected"]["test_accuracy_mean"]])  # fmt: skip
    assert oracle["selected"]["test_accuracy_mean"] == pytest.approx(best)
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
        if k == 0:  # D0 is a candidate too, trained once (round 0)
            d0 = summary["rounds"][0]["reference_loss_mean"]
    assert totals == [600, 600]  # the same budget as D0
    best = min(losses)
    assert entry["candidate"] == ("D0" if d0 <= best else losses.index(best))
    assert entry["trainings"] == 3  # D0 and the two mixtures
    assert entry["shares"] is None or abs(sum(entry["shares"].values()) - 1.0) < 1e-9
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
