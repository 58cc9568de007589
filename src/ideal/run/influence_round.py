"""A round's influence step in the loop: RUN/round-K/influence.json (+ .csv, .png), annotated with
the step the update takes, and scored again on every copy when its sample says nothing.

    RUN/round-K/influence.json   the sensitivities and their standard errors; under the IDEAL rule
                                 `beta` and `step` (the step this update takes) and `direction`
                                 (per domain: sensitivity, standard error, z, what the step used);
                                 after a rescore, `rescored`: the first sample's numbers

`update.rescore` (default on): a sample of at most `influence.max_examples` copies a domain can
leave every sensitivity within `update.min_z` standard errors of 0, and then the step moves
nothing and the run spends none of its remaining trainings. Scoring every copy of the domain's
sample is one more influence pass, no training, and its standard errors are smaller
(docs/method-additions.md). A run killed between the two passes rescores when resumed:
influence.json without `rescored` is the first.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from ideal.artifacts import read_json
from ideal.influence.settings import InfluenceJob
from ideal.methods.rules import IdealRule, direction_table, moves_nothing, requested_change
from ideal.run.config import RunConfig
from ideal.run.rundir import RunPaths
from ideal.run.stages import search_rows

log = logging.getLogger("ideal")

INFLUENCE = "influence.json"


def needs_rescore(config: RunConfig, document: dict[str, Any]) -> bool:
    """Whether influence.json (`document`) is a first sample that `update.rescore` scores again:
    the IDEAL rule's noise leaves no sensitivity, and the cap (influence.max_examples) held some
    domain's sample back (otherwise every copy was scored already)."""
    update, cap = config.update, config.influence.max_examples
    return (
        update.rule == "ideal"
        and update.rescore
        and update.min_z > 0
        and cap is not None
        and "rescored" not in document
        and any(n >= cap for n in (document.get("sampled_examples") or {}).values())
        and bool(document.get("sensitivity_stderr"))
        and moves_nothing(document, update)
    )


def influence_round(
    config: RunConfig,
    paths: RunPaths,
    base: int,
    reference: Path,
    step: float,
    fraction: float,
    main: bool,
) -> None:
    """RUN/round-K/influence.json of round K = `base` (the round an update starts from), on
    `reference` (the direction rows under update.selection), at the step `step` this update takes;
    then, under `update.rescore`, every copy's score when the first sample moves nothing. Each
    pass runs on every process (the main one writes); both are skipped when their file is
    there."""
    from ideal.distributed import barrier

    source = paths.round(base)
    target = source / INFLUENCE
    if not target.is_file():
        log.info("round %d: influence", base)
        _influence_pass(config, paths, source, reference, step, fraction, main,
                        config.influence_job(), first=None)  # fmt: skip
    barrier()
    first = read_json(target)
    if not needs_rescore(config, first):
        return
    largest = max((row["z"] or 0.0 for row in first["direction"].values()), default=0.0)
    log.info(
        "round %d: no sensitivity beyond update.min_z %g standard errors at %s copies a domain "
        "(largest z %.2f); scoring every copy (update.rescore)",
        base, config.update.min_z, config.influence.max_examples, largest,
    )  # fmt: skip
    every = replace(config.influence_job(), config=replace(config.influence, max_examples=None))
    _influence_pass(config, paths, source, reference, step, fraction, main, every, first=first)
    barrier()


def _influence_pass(
    config: RunConfig,
    paths: RunPaths,
    source: Path,
    reference: Path,
    step: float,
    fraction: float,
    main: bool,
    job: InfluenceJob,
    first: dict[str, Any] | None,
) -> None:
    from ideal.influence.step import compute_influence, write_influence_files
    from ideal.progress import track

    result, document = compute_influence(
        source / "model", search_rows(source, fraction, main), reference, job, track,
        features=paths.features,
    )  # fmt: skip
    if fraction < 1.0:  # scored on the search subset; the update moves the whole mixture
        from ideal.data.mixture_io import load_training_set

        document["search_volumes"] = document["volumes"]
        document["volumes"] = load_training_set(source).mixture.volumes
    if config.update.rule == "ideal":  # the step this update takes, m of this round
        document["beta"] = requested_change(IdealRule(config.update, step=step), document)
        document["step"] = step
        document["direction"] = direction_table(
            document, config.update, list(document["sensitivity"])
        )
        if reference != paths.reference:
            document["reference_rows"] = "direction rows (update.selection held out)"
    if first is not None:
        seconds = document["seconds"]
        for part in ("total", "fill"):  # the run paid for both passes
            if part in first["seconds"]:
                seconds[part] = (seconds.get(part) or 0.0) + (first["seconds"][part] or 0.0)
        document["rescored"] = {
            "max_examples": first["max_examples"],
            "sampled_examples": first["sampled_examples"],
            "sensitivity": first["sensitivity"],
            "sensitivity_stderr": first["sensitivity_stderr"],
            "seconds": first["seconds"]["total"],
        }
    if main:
        write_influence_files(source, result, document)
