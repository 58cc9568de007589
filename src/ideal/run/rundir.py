"""The run directory: where a run's rounds live, its stored config, and starting or resuming it.

    RUN/config.yaml   the resolved config + its hash: a resumed run must have the same config,
                      except options added to ideal since, at the value the run had
    RUN/suite/        the generated suite (data + base model), when the config names one
    RUN/round-K/      one directory per round (ideal.run.loop)
    RUN/final/        with `search:`, the returned mixture trained with the run's recipe

A run directory in which no stage began (only its config, the suite and round 0's rows) is started
again at the same --out, whatever its config said: nothing would be lost. `--resume` never starts
again: with a changed config it names the keys that changed.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ideal.artifacts import atomic_write_text
from ideal.errors import IdealError
from ideal.run.config import RunConfig, config_changes, read_changes

log = logging.getLogger("ideal")

# what `ideal run` writes into a run directory before any stage completes
_STARTED = ("config.yaml", "suite", "round-0")


@dataclass(frozen=True)
class RunPaths:
    run: Path
    base: Path
    train: Path
    reference: Path
    test: Path | None  # None: an external evaluator brings its own test sets

    # the feature cache of train.top_layers (ideal.backends.training.top_layers): RUN/features, or one
    # that several runs share (every run of a compare: OUT/features)
    shared_features: Path | None = None

    @property
    def features(self) -> Path:
        return self.shared_features or self.run / "features"

    def round(self, k: int) -> Path:
        return self.run / f"round-{k}"

    @property
    def final(self) -> Path:
        """RUN/final/: with `search:`, the returned mixture trained with the run's recipe."""
        return self.run / "final"


def search_paths(config: RunConfig, paths: RunPaths) -> RunPaths:
    """The paths the search rounds run with: `search.model` as their base model, if any."""
    if config.search is None or not config.search.model:
        return paths
    from ideal.hf import resolve_model_dir

    return replace(paths, base=resolve_model_dir(config.search.model))


LOCK = ".lock"


def run_lock(run: Path) -> Any:
    """An exclusive lock on RUN/.lock for as long as the returned file is open: a second process
    that would run the same directory (a campaign started twice, a worker left behind by a
    killed parent) stops at once with one line instead of training beside the first. The lock
    goes with the process that holds it, however it ends."""
    import fcntl

    handle = open(run / LOCK, "a")  # noqa: SIM115  (held open: the lock lives with it)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise IdealError(
            f"{run}: another process is running this run directory; wait for it or stop it"
        ) from None
    return handle


def started_only(run: Path) -> bool:
    """Whether a run directory holds nothing but what a run writes before its first stage
    starts: its config, the generated suite, round 0's mixture and rows. Anything else (a
    trainer's checkpoints in round-0/model.partial, an external trainer's output or log) is work
    that starting again would lose."""
    names = {p.name for p in run.iterdir()} - {LOCK}
    if not names <= set(_STARTED):
        return False
    first = run / "round-0"
    return not first.exists() or {p.name for p in first.iterdir()} <= {"mixture.json", "data"}


def _start_again(run: Path) -> None:
    for name in _STARTED:
        path = run / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def prepare_run(
    config: RunConfig, run_dir: str | Path, resume: bool, features: Path | None = None
) -> RunPaths:
    """Check or write RUN/config.yaml, generate the suite if needed; returns the data paths
    (`features`: a feature cache shared with other runs, instead of RUN/features)."""
    run = Path(run_dir)
    stored = run / "config.yaml"
    if stored.is_file() and not resume and started_only(run):  # nothing to lose
        previous = yaml.safe_load(stored.read_text()) or {}
        if previous.get("hash") != config.hash():
            log.info("%s: no stage had started; starting again with this config", run)
            _start_again(run)
        resume = True
    if stored.is_file():
        if not resume:
            raise IdealError(
                f"{run}: a run is already here; add --resume to continue it, or choose another --out"
            )
        previous = yaml.safe_load(stored.read_text()) or {}
        if previous.get("hash") != config.hash():
            # options added to ideal since the run started, at their defaults, change nothing
            # and a setting the run never reads (an IDEAL step's, where none runs) changes nothing
            current = config.to_dict()
            changes = read_changes(config_changes(previous, current), current)
            if changes:
                raise IdealError(
                    f"{stored}: the config changed since this run started ({', '.join(changes)}) "
                    "after its first stage began; use another --out"
                )
    elif run.exists() and any(run.iterdir()):
        raise IdealError(f"{run}: output directory exists and is not empty; choose another --out")
    else:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            stored, yaml.safe_dump({"hash": config.hash(), **config.to_dict()}, sort_keys=False)
        )
    if config.suite is not None:
        suite = run / "suite"
        if not suite.is_dir():
            from ideal.data.suite import generate_suite

            log.info("generating the suite into %s", suite)
            generate_suite(config.suite, suite)
        return RunPaths(
            run, suite / "base", suite / "train", suite / "reference", suite / "test", features
        )
    assert config.model and config.train_data and config.reference_data
    from ideal.hf import resolve_model_dir

    return RunPaths(
        run,
        resolve_model_dir(config.model),  # a hub id: its snapshot in the local cache
        Path(config.train_data),
        Path(config.reference_data),
        Path(config.test_data) if config.test_data else None,
        features,
    )
