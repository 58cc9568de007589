"""Which round a run returns (`select`): pure rule by hand, and the loop's summary on a tiny run."""

from __future__ import annotations

import json

import pytest

from ideal.errors import IdealError
from ideal.methods.select import select_round
from ideal.run.compare import method_config
from ideal.run.config import load_config
from ideal.run.summary import summarise_run


def rounds(losses, accuracies):
    return [
        {"round": k, "reference_loss_mean": loss, "reference_accuracy_mean": acc}
        for k, (loss, acc) in enumerate(zip(losses, accuracies, strict=True))
    ]


def test_each_selection_by_hand():
    history = rounds([1.0, 0.7, 0.8, 0.9], [0.20, 0.25, 0.30, 0.30])
    assert select_round(history, "last") == 3
    assert select_round(history, "reference_loss") == 1
    # rounds 2 and 3 tie on accuracy: the lower reference loss (round 2) wins
    assert select_round(history, "reference_accuracy") == 2
    # a full tie keeps the earlier round (D0 when nothing improved)
    assert select_round(rounds([0.5, 0.5], [0.1, 0.1]), "reference_accuracy") == 0
    assert select_round(rounds([0.5, 0.5], [0.1, 0.1]), "reference_loss") == 0


def test_bad_selections_are_one_line():
    with pytest.raises(IdealError, match="unknown 'best'"):
        select_round(rounds([1.0], [0.1]), "best")
    with pytest.raises(IdealError, match="round 1 has no reference accuracy"):
        select_round(rounds([1.0, 0.9], [0.1, None]), "reference_accuracy")


def test_config_refuses_an_unknown_selection(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("suite: {domains: [{name: a, task: add}], capabilities: [add]}\n")
    assert load_config(path).select == "reference_loss"  # the default (docs/results.md)
    with pytest.raises(IdealError, match="select must be one of"):
        load_config(path, ["select=best"])


def test_compare_selects_for_ideal_only(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("suite: {domains: [{name: a, task: add}], capabilities: [add]}\n")
    config = load_config(path, ["select=reference_accuracy"])
    assert method_config(config, "ideal", 1).select == "reference_accuracy"
    assert method_config(config, "first-order", 1).select == "reference_accuracy"
    for baseline in ("original", "uniform", "random", "doge"):
        assert method_config(config, baseline, 1).select == "last"  # a baseline is its mixture
        # ... and still decodes its references: round 0 is shared with ideal, which needs them
        assert method_config(config, baseline, 1).decode_references()
    plain = load_config(path)
    assert not any(method_config(plain, m, 1).decode_references() for m in ("original", "ideal"))


def test_reference_decoding_follows_the_selection(tmp_path):
    """eval.reference_accuracy auto decodes the reference sets only for select reference_accuracy
    (decoding is most of a real model's evaluation); always / never override it."""
    path = tmp_path / "c.yaml"
    path.write_text("suite: {domains: [{name: a, task: add}], capabilities: [add]}\n")
    assert not load_config(path).decode_references()
    assert load_config(path, ["select=reference_accuracy"]).decode_references()
    assert load_config(path, ["eval.reference_accuracy=always"]).decode_references()
    assert not load_config(path, ["eval.reference_accuracy=never"]).decode_references()
    with pytest.raises(IdealError, match="eval.reference_accuracy must be one of"):
        load_config(path, ["eval.reference_accuracy=sometimes"])
    with pytest.raises(IdealError, match="needs eval.reference_accuracy auto or always"):
        load_config(path, ["select=reference_accuracy", "eval.reference_accuracy=never"])


def test_summary_records_the_selected_round(tmp_path):
    run = tmp_path / "run"
    (run).mkdir()
    (run / "config.yaml").write_text("hash: x\nselect: reference_loss\n")
    for k, (loss, acc) in enumerate([(1.0, 0.1), (0.6, 0.2), (0.8, 0.3)]):
        here = run / f"round-{k}"
        (here / "model").mkdir(parents=True)
        (here / "model" / "train_settings.json").write_text(json.dumps({"seconds": 1.0}))
        (here / "mixture.json").write_text(json.dumps({"domains": {"a": {"volume": 10}}}))
        caps = {"add": {"reference_loss": loss, "reference_accuracy": acc, "test_accuracy": acc}}
        metrics = {"capabilities": caps, "test_accuracy_mean": acc, "test_accuracy_worst": acc,
                   "reference_loss_mean": loss, "reference_accuracy_mean": acc, "seconds": 0.1}  # fmt: skip
        (here / "metrics.json").write_text(json.dumps(metrics))
    summary = summarise_run(run).to_json()
    assert summary["select"] == "reference_loss" and summary["selected_round"] == 1
    assert [r["reference_accuracy_mean"] for r in summary["rounds"]] == [0.1, 0.2, 0.3]
