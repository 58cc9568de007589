"""Does the mixture matter? Train once per (mixture, seed) from the base model and compare.

    python benchmarks/mixture_grid.py [--seeds 0,1,2] [--quick] [--threads 1]
    python benchmarks/mixture_grid.py --config src/ideal/configs/real.yaml [--seeds 0,1]
        [--mixture D0] [--mixture uniform] [--mixture "NAME=domain:volume,..."] [key=value ...]

Every mixture has the same total volume as the config's D0 and is trained with the config's recipe
(`ideal run` with rounds=0) for every seed, then evaluated on the test sets. Without `--config` the
mixtures are the demo suite's (below); with it, `--mixture` names them: `D0` (the config's own start),
`uniform` (equal volumes at D0's total) or explicit volumes (a domain left out gets none).

Prints, per mixture, mean +- sd over seeds of the mean test accuracy, the worst capability, the mean
held-out test loss and the mean reference loss, and how far each mixture's mean lies from D0's in units
of D0's standard deviation over seeds (issue 18's "does the mixture matter" test: > 2).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import yaml

from ideal.data.mixture import draw_mixture
from ideal.data.mixture_io import load_training_set, write_mixture_dir
from ideal.errors import IdealError
from ideal.run.config import RunConfig, load_config
from ideal.run.loop import run_loop

DEMO_MIXTURES = {
    "D0 (demo start)": {"add": 250, "reverse": 150, "reverse_alt": 350, "sort": 500, "recall": 250},
    "uniform": {"add": 300, "reverse": 300, "reverse_alt": 300, "sort": 300, "recall": 300},
    "no conflicting domain": {
        "add": 375,
        "reverse": 375,
        "reverse_alt": 1,
        "sort": 375,
        "recall": 374,
    },
    "D0, conflict halved": {
        "add": 250,
        "reverse": 325,
        "reverse_alt": 175,
        "sort": 500,
        "recall": 250,
    },
}


def parse_mixture(text: str, d0: dict[str, int]) -> tuple[str, dict[str, int]]:
    """`D0`, `uniform` or `NAME=domain:volume,...` -> (name, volumes at D0's total)."""
    total = sum(d0.values())
    if text == "D0":
        return "D0", dict(d0)
    if text == "uniform":
        share, extra = divmod(total, len(d0))
        return "uniform", {d: share + (i < extra) for i, d in enumerate(sorted(d0))}
    name, sep, spec = text.partition("=")
    if not sep or not name.strip():
        raise IdealError(f"--mixture {text!r}: expected D0, uniform or NAME=domain:volume,...")
    volumes = {d: 0 for d in d0}
    for part in spec.split(","):
        domain, sep, volume = part.partition(":")
        if not sep or domain.strip() not in d0 or not volume.strip().isdigit():
            raise IdealError(f"--mixture {text!r}: {part!r} is not domain:volume over {sorted(d0)}")
        volumes[domain.strip()] = int(volume)
    if sum(volumes.values()) != total:
        raise IdealError(
            f"--mixture {text!r}: volumes sum to {sum(volumes.values())}, D0's total is {total}"
        )
    return name.strip(), volumes


def mixture_data(config: RunConfig, volumes: dict[str, int], seed: int, out: Path) -> Path:
    """A plain data directory holding `volumes` drawn (seeded) from the config's pools."""
    training = load_training_set(config.train_data)
    sizes = {d: len(t.examples) for d, t in training.pool.items()}
    drawn = {d: v for d, v in volumes.items() if v > 0}
    mixture = draw_mixture(sizes, drawn, config.update.max_repeats, seed)
    write_mixture_dir(out, training, mixture, data_subdir="data")
    return out / "data"


def run_one(
    config: RunConfig, volumes: dict[str, int], seed: int, where: Path, features: Path
) -> dict:
    """Round 0 of one (mixture, seed): its metrics.json. Every run shares the feature cache
    `features` (train.top_layers): the frozen bottom runs once per distinct row."""
    if config.suite is not None:
        suite = replace(
            config.suite,
            seed=seed,
            domains=tuple(replace(d, volume=max(1, volumes[d.name])) for d in config.suite.domains),
        )
        config = replace(config, suite=suite)
    else:
        mix = where / "mix" / "data"
        if not mix.is_dir():  # drawn once: a resumed run trains on the same rows
            mixture_data(config, volumes, seed, where / "mix")
        config = replace(config, train_data=str(mix))
    config = replace(config, rounds=0, seed=seed, train=replace(config.train, seed=seed))
    run_loop(config, where / "run", resume=True, features=features)
    return json.loads((where / "run" / "round-0" / "metrics.json").read_text())


def stats(values: list[float | None]) -> tuple[float, float]:
    array = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else float("nan")


def paired(base: list[dict], other: list[dict], key: str) -> str:
    """The per-seed differences other - base on `key`: mean +- standard error and its verdict."""
    from ideal.paired import verdict

    diffs = np.array([o.get(key) - b.get(key) for b, o in zip(base, other, strict=True)])
    mean = float(diffs.mean())
    stderr = float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else None
    shown = "n/a" if stderr is None else f"{stderr:.3f}"
    z = "" if not stderr else f" = {mean / stderr:+.1f} SE"
    better = mean if "accuracy" in key else -mean  # a lower loss is the better one
    return f"{mean:+.3f} +- {shown}{z} ({verdict(better, stderr)})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--quick", action="store_true", help="the quick demo's suite and recipe")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", help="a run config (default: the demo's)")
    parser.add_argument(
        "--mixture", action="append", default=[], help="D0, uniform or NAME=d:v,..."
    )
    parser.add_argument("--json", help="also write every run's metrics here")
    parser.add_argument("--features", help="the feature cache (train.top_layers) to share")
    parser.add_argument(
        "--work", help="keep every run here (resumed on a rerun), not in a temp dir"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.config is None:
        name = "demo-quick.yaml" if args.quick else "demo.yaml"
        config = load_config(
            None,
            args.overrides,
            base=yaml.safe_load((files("ideal") / "configs" / name).read_text()),
        )
        scale = 0.4 if args.quick else 1.0
        mixtures = {
            n: {d: max(1, round(scale * v)) for d, v in vols.items()}
            for n, vols in DEMO_MIXTURES.items()
        }
    else:
        config = load_config(args.config, args.overrides)
        if config.suite is not None:
            d0 = {d.name: d.volume for d in config.suite.domains}
        else:
            d0 = load_training_set(config.train_data).mixture.volumes
        mixtures = dict(parse_mixture(m, d0) for m in (args.mixture or ["D0", "uniform"]))
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), seeds {seeds}, "
        f"config {args.config or ('demo-quick' if args.quick else 'demo')}",
        flush=True,
    )
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.work or scratch
        cache = Path(args.features) if args.features else Path(tmp) / "features"
        for index, (name, volumes) in enumerate(mixtures.items()):
            start = time.perf_counter()
            results[name] = [
                run_one(config, volumes, seed, Path(tmp) / f"{index}-{seed}", cache)
                for seed in seeds
            ]
            runs = results[name]
            acc, worst = (
                stats([r["test_accuracy_mean"] for r in runs]),
                stats([r["test_accuracy_worst"] for r in runs]),
            )
            loss, ref = (
                stats([r.get("test_loss_mean") for r in runs]),
                stats([r["reference_loss_mean"] for r in runs]),
            )
            per_cap = {
                c: round(stats([r["capabilities"][c].get("test_accuracy") for r in runs])[0], 3)
                for c in runs[0]["capabilities"]
            }
            print(
                f"{name:<24} {json.dumps(volumes)}\n    mean acc {acc[0]:.3f} +- {acc[1]:.3f}   "
                f"worst {worst[0]:.3f} +- {worst[1]:.3f}   test loss {loss[0]:.3f} +- {loss[1]:.3f}   "
                f"ref loss {ref[0]:.3f} +- {ref[1]:.3f}   per capability {json.dumps(per_cap)}   "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    first = next(iter(results))
    print(f"\ndistance from {first!r} in its sd over seeds (> 2: the mixture matters)")
    for key, label in (("test_accuracy_mean", "mean acc"), ("test_loss_mean", "test loss")):
        mean0, sd0 = stats([r.get(key) for r in results[first]])
        for name, runs in list(results.items())[1:]:
            mean = stats([r.get(key) for r in runs])[0]
            print(f"  {label:<9} {name:<24} {(mean - mean0):+.3f} = {(mean - mean0) / sd0:+.1f} sd")
    print(f"\npaired differences from {first!r} over seeds (mean +- standard error; the gate:")
    print("two mixtures at the same total differ by more than 2 paired standard errors)")
    for key, label in (("test_accuracy_mean", "mean acc"), ("test_loss_mean", "test loss")):
        for name, runs in list(results.items())[1:]:
            diff = paired(results[first], runs, key)
            print(f"  {label:<9} {name:<24} {diff}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"mixtures": mixtures, "seeds": seeds, "metrics": results}, indent=1)
        )


if __name__ == "__main__":
    main()
