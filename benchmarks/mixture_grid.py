"""Does the mixture matter on the demo suite? Train once per (mixture, seed) and compare.

    python benchmarks/mixture_grid.py [--seeds 0,1,2] [--quick] [--threads 1]

Every mixture has the demo's total volume; each is trained from the base model with the demo's
recipe (`ideal run` with rounds=0) for every seed, and evaluated on the test sets. Prints mean +- std
over seeds of the mean test accuracy, the worst capability and the mean reference loss.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
import yaml

from ideal.config import load_config
from ideal.loop import run_loop

MIXTURES = {
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--quick", action="store_true", help="the quick demo's suite and recipe")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = yaml.safe_load(
        (
            files("ideal") / "configs" / ("demo-quick.yaml" if args.quick else "demo.yaml")
        ).read_text()
    )
    scale = 0.4 if args.quick else 1.0
    seeds = [int(s) for s in args.seeds.split(",")]
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), seeds {seeds}, {'quick' if args.quick else 'full'} demo suite"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, volumes in MIXTURES.items():
            results = []
            start = time.perf_counter()
            for seed in seeds:
                config = dict(base)
                config["suite"] = {
                    **base["suite"],
                    "domains": [
                        {**d, "volume": max(1, round(scale * volumes[d["name"]]))}
                        for d in base["suite"]["domains"]
                    ],
                }
                overrides = ["rounds=0", f"seed={seed}", f"suite.seed={seed}", f"train.seed={seed}"]
                run = Path(tmp) / f"{len(results)}-{name.replace(' ', '_')}-{seed}"
                summary = run_loop(load_config(None, overrides, base=config), run)
                results.append(summary["rounds"][0])
            mean = np.array([r["test_accuracy_mean"] for r in results])
            worst = np.array([r["test_accuracy_worst"] for r in results])
            loss = np.array([r["reference_loss_mean"] for r in results])
            per_cap = {
                c: np.mean([r["test_accuracy"][c] for r in results])
                for c in results[0]["test_accuracy"]
            }
            print(
                f"{name:<24} mean acc {mean.mean():.3f} +- {mean.std(ddof=1):.3f}   worst {worst.mean():.3f} +- {worst.std(ddof=1):.3f}"
                f"   ref loss {loss.mean():.3f} +- {loss.std(ddof=1):.3f}   per capability {json.dumps({k: round(v, 3) for k, v in per_cap.items()})}"
                f"   ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
