"""How close EK-FAC, K-FAC and first-order scores come to the exact Gauss-Newton, and why not closer;
and how close `--refine K` (EK-FAC-preconditioned conjugate gradient on the exact matrix) comes.

    python benchmarks/ekfac_vs_exact.py [--seeds 0,1,2,3,4,5] [--draws 8] [--refine 1,3,10]

On the tiny problem of the test suite (`tests/helpers.toy_influence_problem`: 1-block Llama, 1,152
MLP weights, 3 domains, 3 references), for every problem seed: Pearson correlation and sign
agreement (of 9) of each curvature's scores with `exact`, and with "block-diagonal exact" (the exact
matrix with its cross-layer blocks zeroed, which is all EK-FAC can represent), plus EK-FAC with
--fisher-samples DRAWS, and EK-FAC refined by K conjugate-gradient steps for each K of --refine.
Then, per seed, the relative residuals (max over the 3 references) of the EK-FAC solution as it
is, of the scaled start and after the last K, and the seconds of ekfac and of each refine K; a
last row gives the mean Pearson per column and the seeds with 9/9 signs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import toy_influence_problem  # noqa: E402

import ideal.influence.engine as influence  # noqa: E402  (patched: its dense_gauss_newton)
from ideal.influence.capture import layer_shape, select_layers  # noqa: E402
from ideal.influence.engine import domain_influence  # noqa: E402
from ideal.influence.exact import dense_gauss_newton as dense  # noqa: E402
from ideal.influence.settings import InfluenceSettings  # noqa: E402


def block_diagonal(model, layers, domains, pad_id):
    full = dense(model, layers, domains, pad_id)
    sizes = [int(np.prod(layer_shape(m))) for m in layers.values()]
    offsets = np.cumsum([0, *sizes])
    out = torch.zeros_like(full)
    for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
        out[lo:hi, lo:hi] = full[lo:hi, lo:hi]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0,1,2,3,4,5")
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--refine", default="1,3,10", help="conjugate-gradient steps, e.g. 1,3,10")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = [int(k) for k in args.refine.split(",") if k.strip()]

    columns = ["ekfac", "kfac", "identity", f"ekfac x{args.draws}", "blockdiag", "ekfac~blockdiag"]
    columns += [f"refine {k}" for k in steps]
    extra = ["res ekfac", "res start", f"res {steps[-1]}", "s ekfac"] + [
        f"s refine {k}" for k in steps
    ]
    print("seed  " + "  ".join(f"{c:>16}" for c in columns) + "  " + "  ".join(f"{c:>10}" for c in extra)
          + "   (Pearson vs exact, signs; relative residuals, max over references; seconds)")  # fmt: skip
    pearson: dict[str, list[float]] = {c: [] for c in columns}
    all_signs: dict[str, int] = dict.fromkeys(columns, 0)

    def agree(column: str, a: np.ndarray, b: np.ndarray) -> str:
        r, signs = float(np.corrcoef(a, b)[0, 1]), int((np.sign(a) == np.sign(b)).sum())
        pearson[column].append(r)
        all_signs[column] += signs == 9
        return f"{r:.3f} ({signs}/9)"

    for seed in (int(s) for s in args.seeds.split(",")):
        torch.manual_seed(seed)
        problem = toy_influence_problem(seed=seed)

        def run(problem=problem, **kwargs):
            model, domains, references = problem
            settings = InfluenceSettings(batch_size=8, **kwargs)
            layers = select_layers(model)
            start = time.perf_counter()
            result = domain_influence(model, layers, domains, references, settings, 0)
            return result, time.perf_counter() - start

        def scores(**kwargs) -> np.ndarray:
            return run(**kwargs)[0].scores.ravel()

        exact = scores(curvature="exact")
        with mock.patch.object(influence, "dense_gauss_newton", block_diagonal):
            blockdiag = scores(curvature="exact")
        ekfac_result, ekfac_seconds = run(curvature="ekfac")
        ekfac = ekfac_result.scores.ravel()
        row = [
            agree("ekfac", exact, ekfac),
            agree("kfac", exact, scores(curvature="kfac")),
            agree("identity", exact, scores(curvature="identity")),
            agree(
                f"ekfac x{args.draws}", exact, scores(curvature="ekfac", fisher_samples=args.draws)
            ),
            agree("blockdiag", exact, blockdiag),
            agree("ekfac~blockdiag", blockdiag, ekfac),
        ]
        seconds = [ekfac_seconds]
        for k in steps:
            refined, elapsed = run(curvature="ekfac", refine=k)
            row.append(agree(f"refine {k}", exact, refined.scores.ravel()))
            seconds.append(elapsed)
        (report,) = refined.refinement  # the last K's: one layer group
        residuals = [max(report["preconditioned_residual"].values()),
                     max(v[0] for v in report["residuals"].values()),
                     max(v[-1] for v in report["residuals"].values())]  # fmt: skip
        print(f"{seed:>4}  " + "  ".join(f"{c:>16}" for c in row) + "  "
              + "  ".join(f"{v:>10.3g}" for v in residuals + seconds), flush=True)  # fmt: skip
    means = [f"{np.mean(pearson[c]):.3f} ({all_signs[c]} x 9/9)" for c in columns]
    print("mean  " + "  ".join(f"{c:>16}" for c in means))


if __name__ == "__main__":
    main()
