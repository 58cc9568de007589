"""RUN/summary.json, computed once from the round directories (SPEC.md).

Each round's entry says what the round was (D0, the uniform probe, an update from round K), its
volumes, scores and seconds, and the predicted against the realised change of the mean reference
loss; the summary names the probe, the round the IDEAL updates went on from, and the selected round.
Under a search recipe (`search:`) it adds the final training (RUN/final/: the selected round's
mixture trained with the run's recipe) and, for every run, the compute of the whole run.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml

from ideal.artifacts import read_json
from ideal.errors import IdealError
from ideal.methods.select import select_round
from ideal.records import (
    KIND_D0,
    KIND_FINAL,
    KIND_PROBE,
    Compute,
    RoundRecord,
    RunSummary,
    UpdateRecord,
)
from ideal.run.config import RunConfig
from ideal.run.search import SearchSettings


def summarise_run(run: str | Path) -> RunSummary:
    """The run's summary from RUN/round-K/ (every round with metrics) and RUN/config.yaml."""
    run = Path(run)
    stored = run / "config.yaml"
    config = (yaml.safe_load(stored.read_text()) or {}) if stored.is_file() else {}
    rule = (config.get("update") or {}).get("rule", "ideal")
    rounds: list[RoundRecord] = []
    probe_round = continued_from = None
    k = 0
    while (run / f"round-{k}" / "metrics.json").is_file():
        here = run / f"round-{k}"
        mixture, metrics = read_json(here / "mixture.json"), read_json(here / "metrics.json")
        update = UpdateRecord.from_json(mixture.get("update", {}), k) if k > 0 else None
        # a run from before the flag: round 1 with the uniform rule inside an ideal run
        probe = update is not None and (
            update.probe or (k == 1 and update.rule == "uniform" and rule == "ideal")
        )
        if probe:
            probe_round = k
        elif update is not None and probe_round is not None and continued_from is None:
            continued_from = update.from_round
        kind = KIND_D0 if update is None else KIND_PROBE if probe else update.rule
        rounds.append(_round(here, k, kind, update, mixture, metrics, rounds))
        k += 1
    stopped = None
    choice = run / f"step-{k}" / "choice.json"  # an update after the last round that kept none
    if rounds and choice.is_file() and not (run / f"round-{k}").is_dir():
        stopped = read_json(choice)["reason"]
        spent = _candidate_seconds(run / f"step-{k}", kept=None)
        if spent:
            last = rounds[-1]
            seconds = {
                **last.seconds,
                "candidates": (last.seconds.get("candidates") or 0.0) + spent,
            }
            rounds[-1] = replace(last, seconds=seconds)
    select = config.get("select") or RunConfig.select  # the default
    records = [asdict(r) for r in rounds]
    selected = select_round(records, select) if rounds else None
    final = None
    here = run / "final"
    if (here / "metrics.json").is_file():
        mixture, metrics = read_json(here / "mixture.json"), read_json(here / "metrics.json")
        source = mixture["final"]["from_round"]
        final = replace(_round(here, source, KIND_FINAL, None, mixture, metrics, rounds),
                        from_round=source)  # fmt: skip
    search = config.get("search")
    recipe = None if search is None else SearchSettings(**search).describe()
    return RunSummary(
        rounds, select, selected, probe_round, continued_from, recipe, final,
        _compute(rounds, final, trainings(run)) if rounds else None, stopped,
    )  # fmt: skip


def trainings(run: Path) -> int:
    """Models the run trained: every round's, every candidate's (RUN/step-K/*/; the kept one's
    model moved into its round), and the final training's. A round whose model was copied in
    (a compare's shared round 0) counts too: the run needed it."""
    models = [run / f"round-{k}" / "model" for k in range(_count_rounds(run))]
    models += sorted(run.glob("step-*/*/model"))
    models.append(run / "final" / "model")
    return sum(m.is_dir() for m in models)


def _count_rounds(run: Path) -> int:
    k = 0
    while (run / f"round-{k}").is_dir():
        k += 1
    return k


def _compute(rounds: list[RoundRecord], final: RoundRecord | None, trained: int) -> Compute:
    """Seconds per stage over the rounds, the final training's, the unit of cost_in_sfts, and
    how many models were trained."""
    spent: dict[str, float] = {}
    for r in rounds:
        for stage, seconds in r.seconds.items():
            spent[stage] = spent.get(stage, 0.0) + (seconds or 0.0)
    if final is None:
        return Compute(spent, {}, rounds[0].seconds.get("train"), "round 0 training", trained)
    done = {stage: seconds for stage, seconds in final.seconds.items() if seconds is not None}
    return Compute(spent, done, final.seconds.get("train"), "final training", trained)


def _round(
    here: Path,
    k: int,
    kind: str,
    update: UpdateRecord | None,
    mixture: dict[str, Any],
    metrics: dict[str, Any],
    earlier: list[RoundRecord],
) -> RoundRecord:
    run = here.parent
    caps = metrics["capabilities"]
    train_settings = read_json(here / "model" / "train_settings.json")
    seconds: dict[str, float | None] = {"train": train_settings.get("seconds"), "influence": None}
    # the feature cache's fill (train.top_layers) is an item of its own: training's seconds never
    # held it, evaluation's and influence's did, and whoever fills a row first pays for it
    fill = train_settings.get("fill_seconds") or 0.0
    if (here / "influence.json").is_file():
        spent = read_json(here / "influence.json")["seconds"]
        fill += spent.get("fill") or 0.0
        seconds["influence"] = spent["total"] - (spent.get("fill") or 0.0)
    fill += metrics.get("fill_seconds") or 0.0
    seconds["eval"] = metrics["seconds"] - (metrics.get("fill_seconds") or 0.0)
    if (here / "proxy.json").is_file():  # DoReMi / DoGE: the proxy run is their signal's cost
        seconds["proxy"] = read_json(here / "proxy.json")["seconds"]["total"]
    if fill:
        seconds["fill"] = fill
    kept = (update.details.get("candidate") if update is not None else None) or None
    if kept is not None:  # the other candidates of a step: their training and evaluation
        seconds["candidates"] = _candidate_seconds(run / f"step-{k}", kept)
    predicted = realised = None
    if update is not None:
        source = run / f"round-{update.from_round}" / "influence.json"
        if source.is_file():
            sensitivity = read_json(source)["sensitivity"]
            beta = update.beta_realised
            predicted = float(sum(sensitivity[d] * beta.get(d, 0.0) for d in sensitivity))
        realised = metrics["reference_loss_mean"] - earlier[update.from_round].reference_loss_mean
    return RoundRecord(
        round=k,
        kind=kind,
        from_round=None if update is None else update.from_round,
        volumes={d: e["volume"] for d, e in mixture["domains"].items()},
        test_accuracy={c: v.get("test_accuracy") for c, v in caps.items()},
        test_accuracy_mean=metrics["test_accuracy_mean"],
        test_accuracy_worst=metrics["test_accuracy_worst"],
        reference_loss={c: v.get("reference_loss") for c, v in caps.items()},
        reference_loss_mean=metrics["reference_loss_mean"],
        test_loss={c: v.get("test_loss") for c, v in caps.items()},
        test_loss_mean=metrics.get("test_loss_mean"),
        test_loss_worst=max(
            (v["test_loss"] for v in caps.values() if v.get("test_loss") is not None),
            default=None,
        ),
        reference_accuracy={c: v.get("reference_accuracy") for c, v in caps.items()},
        reference_accuracy_mean=metrics.get("reference_accuracy_mean"),
        predicted_reference_loss_change=predicted,
        realised_reference_loss_change=realised,
        seconds=seconds,
        direction=update.details.get("direction") if update is not None else None,
        candidates=update.details.get("candidates") if update is not None else None,
        scale=update.details.get("scale") if update is not None else None,
        scale_next=update.details.get("scale_next") if update is not None else None,
        rescored_from=(update.details.get("rescored") or {}).get("from_max_examples")
        if update is not None
        else None,
    )


def _candidate_seconds(step: Path, kept: str | None) -> float:
    """The training (with its fill) and evaluation (fill included) of a step's candidates, the
    kept one left out (its model moved into its round, which counts it)."""
    spent = 0.0
    for model in sorted(step.glob("*/model")):
        if model.parent.name == kept:
            continue
        trained = read_json(model / "train_settings.json")
        spent += (trained.get("seconds") or 0.0) + (trained.get("fill_seconds") or 0.0)
        if (model.parent / "metrics.json").is_file():
            spent += read_json(model.parent / "metrics.json").get("seconds") or 0.0
    return spent


def returned_mixture(path: str | Path) -> Path:
    """The mixture.json of a round directory, or of the round a run returned (summary.json)."""
    path = Path(path)
    if (path / "mixture.json").is_file():
        return path / "mixture.json"
    if (path / "summary.json").is_file():
        summary = summarise_run(path)  # from the rounds: a run of an older ideal too
        if summary.selected_round is None:
            raise IdealError(f"{path}/summary.json: the run returned no round yet")
        return path / f"round-{summary.selected_round}" / "mixture.json"
    raise IdealError(
        f"{path}: neither a finished run (no summary.json) nor a round directory (no mixture.json)"
    )
