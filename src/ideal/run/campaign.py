"""A comparison kept in the results ledger: `ideal compare CONFIG ... --ledger FILE [--jobs N]`.

    OUT/inputs.json        what every cell shares: the data's hash, the code fingerprint, the
                           commit and the machine (computed once, read by the worker processes)
    OUT/campaign.yaml      the resolved config, for the worker processes
    OUT/logs/seed-S.log    each worker's log
    OUT/<method>/seed-S/   the runs (resumable, as in any comparison)

The cells the ledger already holds for the same inputs are skipped; the others run, and each is
appended to the ledger as soon as it finishes. With `jobs` > 1 the seeds are shared out among
that many worker processes (`ideal compare ... --seeds S`), one torch thread each; the methods of
a seed run in order in one worker, so its round 0 is trained once. Stopped at any moment, a
campaign started again skips what the ledger holds and resumes the runs that were cut.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ideal.artifacts import atomic_write_json, atomic_write_text, read_json
from ideal.errors import IdealError
from ideal.run.compare import compare_document, run_compare
from ideal.run.config import MIRRORED, RunConfig
from ideal.run.ledger import Book, commit_of, machine, read_ledger, source_hash, tree_hash

log = logging.getLogger("ideal")


def data_hash(config: RunConfig) -> str:
    """The content of the data and the base model a config names (the embedded suite is
    generated from its settings, which the cell's settings hold, by code the fingerprint
    covers)."""
    if config.suite is not None:
        return "suite"
    from ideal.hf import resolve_model_dir

    paths = [resolve_model_dir(config.model or ""), config.train_data, config.reference_data,
             config.test_data]  # fmt: skip
    if config.search is not None and config.search.model:
        paths.append(resolve_model_dir(config.search.model))
    # files a run reads by path: an external trainer's base config, lm-eval's local tasks
    paths += [config.train.base_config, config.eval.include_path]
    return tree_hash(paths)


def suite_name(config: RunConfig, config_file: Path | None) -> str:
    """What the cells were measured on, in a word: the config file's stem (demo, real, ...)."""
    return config_file.stem if config_file is not None else "config"


def open_book(
    config: RunConfig,
    methods: list[str],
    ledger: Path,
    campaign: str,
    suite: str,
    out: Path,
    inputs: Path | None = None,
) -> Book:
    """The ledger's book for this comparison: inputs read from `inputs` (a worker) or computed
    and written to OUT/inputs.json."""
    from ideal.run.fingerprint import code_fingerprint

    if inputs is not None:  # a worker: the campaign's inputs, measured on this very code
        shared = read_json(inputs)
        if shared.get("source") != source_hash():
            raise IdealError(
                f"{inputs}: the ideal package changed since this campaign measured its code's "
                "fingerprint; start the campaign again (its cells are kept)"
            )
    else:
        log.info("ledger: hashing the data and fingerprinting the code")
        began = time.perf_counter()
        shared = {
            "data": data_hash(config),
            "code": code_fingerprint(methods),
            "source": source_hash(),
            "commit": commit_of(Path(__file__).resolve().parent),
            "machine": machine(),
        }
        shared["seconds"] = time.perf_counter() - began
        atomic_write_json(out / "inputs.json", shared)
    return Book(ledger, campaign, suite, shared["data"], shared["code"], shared["commit"],
                shared["machine"])  # fmt: skip


def campaign_config(config: RunConfig, out: Path) -> Path:
    """OUT/campaign.yaml: the resolved config, loadable as it is (mirrored keys at their home)."""
    tree = config.to_dict()
    for dotted in MIRRORED:
        section, key = dotted.split(".")
        tree.get(section, {}).pop(key, None)
    path = out / "campaign.yaml"
    atomic_write_text(path, yaml.safe_dump(tree, sort_keys=False))
    return path


def run_campaign(
    config: RunConfig,
    methods: list[str],
    seeds: list[int],
    out: Path,
    ledger: Path,
    campaign: str,
    suite: str,
    jobs: int = 1,
    random_candidates: int | None = None,
    grid_resolution: int | None = None,
    features: Path | None = None,
    inputs: Path | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """Every (method, seed) measured or found in the ledger; compare.json from the ledger."""
    if jobs < 1:
        raise IdealError("--jobs must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    book = open_book(config, methods, ledger, campaign, suite, out, inputs)
    features = features or out / "features"
    if jobs > 1 and len(seeds) > 1:
        _workers(config, methods, seeds, out, book, jobs, random_candidates, grid_resolution,
                 features)  # fmt: skip
    return run_compare(config, methods, seeds, out, random_candidates, grid_resolution, book,
                       features, report)  # fmt: skip


def _workers(
    config: RunConfig,
    methods: list[str],
    seeds: list[int],
    out: Path,
    book: Book,
    jobs: int,
    random_candidates: int | None,
    grid_resolution: int | None,
    features: Path,
) -> None:
    """One `ideal compare` process per seed, at most `jobs` at a time, one torch thread each."""
    path = campaign_config(config, out)
    (out / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread each
    pending = list(seeds)
    running: dict[int, tuple[subprocess.Popen, Any]] = {}
    failed: list[str] = []

    def stop(signum: int, frame: Any) -> None:  # a stopped campaign stops its workers
        for process, _ in running.values():
            process.terminate()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                seed = pending.pop(0)
                argv = [
                    sys.executable, "-m", "ideal", "compare", str(path),
                    "--methods", ",".join(methods), "--seeds", f"{seed}-{seed}",
                    "--out", str(out), "--ledger", str(book.path), "--campaign", book.campaign,
                    "--suite", book.suite, "--features", str(features),
                    "--inputs", str(out / "inputs.json"), "--no-report",
                ]  # fmt: skip
                if random_candidates is not None:
                    argv += ["--random-candidates", str(random_candidates)]
                if grid_resolution is not None:
                    argv += ["--grid-resolution", str(grid_resolution)]
                handle = open(out / "logs" / f"seed-{seed}.log", "a")  # noqa: SIM115
                log.info("campaign: seed %d started (log: %s)", seed, handle.name)
                process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env)
                running[seed] = (process, handle)
            time.sleep(2)
            for seed, (process, handle) in list(running.items()):
                if process.poll() is None:
                    continue
                handle.close()
                del running[seed]
                cells = sum(c.campaign == book.campaign for c in read_ledger(book.path))
                if process.returncode != 0:
                    failed.append(f"seed {seed} (exit {process.returncode}, {handle.name})")
                log.info("campaign: seed %d done (exit %d); the ledger holds %d cells of %s",
                         seed, process.returncode, cells, book.campaign)  # fmt: skip
    except KeyboardInterrupt:
        for process, handle in running.values():
            process.terminate()
            process.wait()
            handle.close()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed:
        raise IdealError(f"campaign: {len(failed)} worker(s) failed: {'; '.join(failed)}")


def ledger_document(ledger: Path, campaign: str) -> dict[str, Any]:
    """compare.json's statistics rebuilt from a campaign's cells in the ledger (the latest cell
    of each method and seed)."""
    cells = [c for c in read_ledger(ledger) if c.campaign == campaign]
    if not cells:
        raise IdealError(f"{ledger}: no cell of campaign '{campaign}'")
    # one set of inputs per method: those of its latest cell (a campaign re-run after a change
    # of code or data keeps its older cells in the ledger, but never beside the new ones)
    current = {c.method: json.dumps(c.inputs, sort_keys=True) for c in cells}
    stale = [c for c in cells if json.dumps(c.inputs, sort_keys=True) != current[c.method]]
    cells = [c for c in cells if json.dumps(c.inputs, sort_keys=True) == current[c.method]]
    latest: dict[tuple[str, int], Any] = {}
    for cell in cells:
        latest[(cell.method, cell.seed)] = cell
    methods = list(dict.fromkeys(c.method for c in cells))
    seeds = sorted({c.seed for c in cells})
    runs = {m: [latest[(m, s)].run for s in seeds if (m, s) in latest] for m in methods}
    document = compare_document(runs, seeds, "", None)  # cells measured apart: their own units
    document["campaign"] = campaign
    document["suite"] = cells[-1].suite
    document["cells"] = len(latest)
    document["stale_cells"] = len(stale)
    document["machines"] = sorted({json.dumps(c.machine, sort_keys=True) for c in cells})
    document["commits"] = sorted({c.commit for c in cells})
    return document
