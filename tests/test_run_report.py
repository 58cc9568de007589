"""The run report where only some rounds measured accuracy (`eval.accuracy_rounds: returned`)."""

import json
import warnings

from ideal.report.run import write_report


def _summary(run, accuracies):
    rounds = []
    for k, accuracy in enumerate(accuracies):
        (run / f"round-{k}").mkdir(parents=True)
        rounds.append({
            "round": k, "volumes": {"a": 4 + k, "b": 4},
            "test_accuracy": {"c": accuracy, "d": accuracy},
            "test_accuracy_mean": accuracy, "test_accuracy_worst": accuracy,
            "reference_loss": {"c": 1.0 - 0.1 * k, "d": 1.0}, "reference_loss_mean": 1.0 - 0.05 * k,
            "predicted_reference_loss_change": None, "realised_reference_loss_change": None,
            "seconds": {"train": 1.0, "influence": None, "eval": 1.0},
        })  # fmt: skip
    (run / "summary.json").write_text(json.dumps({"rounds": rounds, "selected_round": 1}))


def test_accuracy_of_the_returned_round_only_is_plotted_without_warnings(tmp_path):
    run = tmp_path / "run"
    _summary(run, [None, 0.6, None])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warned of an empty legend here before
        page = write_report(run).read_text()
    assert (run / "accuracy.png").is_file() and 'alt="accuracy"' in page


def test_no_accuracy_plot_where_no_round_decoded(tmp_path):
    run = tmp_path / "run"
    _summary(run, [None, None])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_report(run)
    assert not (run / "accuracy.png").exists() and (run / "reference_loss.png").is_file()
