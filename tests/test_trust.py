"""The trust region of the IDEAL step (`update.trust_region`): rule by hand, decisions read from
round directories, and a tiny loop whose records follow the rule."""

from __future__ import annotations

import json

import pytest

from ideal.errors import IdealError
from ideal.methods.trust import StepDecision, trust_step
from ideal.run.compare import method_config
from ideal.run.config import load_config
from ideal.run.loop import run_loop, step_decision
from ideal.run.rundir import RunPaths
from tests.test_loop import TINY


def test_trust_step_by_hand():
    assert trust_step(0.3, 0, 1.0, 1, 0.9) == StepDecision(0.6, 1, True)
    assert trust_step(0.6, 1, 0.9, 2, 0.8) == StepDecision(0.9, 2, True)  # capped at max_step
    assert trust_step(0.6, 1, 0.9, 2, 0.95) == StepDecision(0.3, 1, False)  # back to round 1
    assert trust_step(0.6, 1, 0.9, 2, 0.9) == StepDecision(0.3, 1, False)  # no gain: rejected
    with pytest.raises(IdealError, match="steps must be in"):
        trust_step(1.2, 0, 1.0, 1, 0.5)


def write_round(run, k, loss, update=None):
    here = run / f"round-{k}"
    here.mkdir(parents=True)
    (here / "metrics.json").write_text(json.dumps({"reference_loss_mean": loss}))
    if update is not None:
        (here / "mixture.json").write_text(json.dumps({"update": update}))


def test_step_decision_reads_the_base_round(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(TINY)
    trusting = load_config(config, ["update.trust_region=true"])
    run = tmp_path / "run"
    write_round(run, 0, 1.0)
    write_round(run, 1, 1.2, {"step": 0.3, "from_round": 0})  # Q rose: rejected
    write_round(run, 2, 0.8, {"step": 0.15, "from_round": 0})  # below round 0: accepted
    paths = RunPaths(run, run, run, run, run)
    assert step_decision(trusting, paths, 0) == StepDecision(0.3, 0, True)
    assert step_decision(trusting, paths, 1) == StepDecision(0.15, 0, False)
    assert step_decision(trusting, paths, 2) == StepDecision(0.3, 2, True)
    # without the trust region: always the last round and update.step
    assert step_decision(load_config(config), paths, 1) == StepDecision(0.3, 1, True)


def test_a_trusting_loop_records_each_decision(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(TINY)
    run = tmp_path / "run"
    summary = run_loop(load_config(config, ["rounds=3", "update.trust_region=true"]), run).to_json()
    losses = [r["reference_loss_mean"] for r in summary["rounds"]]
    step, base = 0.3, 0
    for k in range(1, len(summary["rounds"])):
        update = json.loads((run / f"round-{k}" / "mixture.json").read_text())["update"]
        assert update["step"] == pytest.approx(step) and update["from_round"] == base
        manifest = json.loads((run / f"round-{k}" / "mixture.json").read_text())
        assert manifest["round"] == k
        previous = json.loads((run / f"round-{base}" / "mixture.json").read_text())
        assert update["previous_volumes"] == {
            d: e["volume"] for d, e in previous["domains"].items()
        }
        realised = summary["rounds"][k]["realised_reference_loss_change"]
        assert realised == pytest.approx(losses[k] - losses[base])
        decision = trust_step(step, base, losses[base], k, losses[k])
        step, base = decision.step, decision.base
        if k < 3:  # a rejected round's influence is never computed
            assert (run / f"round-{k}" / "influence.json").is_file() == decision.accepted
    # each influence.json says which rounds stepped from it, and its beta and step are the
    # latest's (after a backtrack the base's file serves a second, smaller step)
    for k in range(len(summary["rounds"]) - 1):
        path = run / f"round-{k}" / "influence.json"
        if not path.is_file():
            continue
        document = json.loads(path.read_text())
        users = [u["round"] for u in document["used_by"]]
        assert users == sorted(
            j for j in range(1, len(summary["rounds"]))
            if json.loads((run / f"round-{j}" / "mixture.json").read_text())["update"]["from_round"] == k
        )  # fmt: skip
        latest = json.loads((run / f"round-{users[-1]}" / "mixture.json").read_text())["update"]
        assert document["step"] == pytest.approx(latest["step"])
        assert document["beta"] == pytest.approx(latest["beta"])


def test_compare_method_ideal_trust(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(TINY)
    loaded = load_config(config)
    assert method_config(loaded, "ideal-trust", 0).update.trust_region
    assert not method_config(loaded, "ideal", 0).update.trust_region
    both = method_config(loaded, "ideal-unseen-trust", 0)
    assert both.update.trust_region and both.influence.domain_rows == "unseen"
    assert not method_config(loaded, "original", 0).update.trust_region  # round 0 shared
