"""How close EK-FAC, K-FAC and first-order scores come to the exact Gauss-Newton, and why not closer.

    python benchmarks/ekfac_vs_exact.py [--seeds 0,1,2,3,4,5] [--draws 8]

On the tiny problem of the test suite (`tests/helpers.toy_influence_problem`: 1-block Llama, 1,152
MLP weights, 3 domains, 3 references), for every problem seed: Pearson correlation and sign
agreement (of 9) of each curvature's scores with `exact`, and with "block-diagonal exact" (the exact
matrix with its cross-layer blocks zeroed, which is all EK-FAC can represent), plus EK-FAC with
--fisher-samples DRAWS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import toy_influence_problem  # noqa: E402

import ideal.influence.engine as influence  # noqa: E402
from ideal.influence.capture import layer_shape, select_layers  # noqa: E402
from ideal.influence.engine import InfluenceSettings, domain_influence  # noqa: E402

dense = influence.dense_gauss_newton


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
    args = parser.parse_args()
    torch.set_num_threads(1)

    def agree(a: np.ndarray, b: np.ndarray) -> str:
        return f"{np.corrcoef(a, b)[0, 1]:.3f} ({int((np.sign(a) == np.sign(b)).sum())}/9)"

    columns = ["ekfac", "kfac", "identity", f"ekfac x{args.draws}", "blockdiag", "ekfac~blockdiag"]
    print("seed  " + "  ".join(f"{c:>16}" for c in columns) + "   (Pearson vs exact, signs)")
    for seed in (int(s) for s in args.seeds.split(",")):
        torch.manual_seed(seed)
        problem = toy_influence_problem(seed=seed)

        def scores(problem=problem, **kwargs) -> np.ndarray:
            model, domains, references = problem
            settings = InfluenceSettings(batch_size=8, **kwargs)
            layers = select_layers(model)
            return domain_influence(model, layers, domains, references, settings, 0).scores.ravel()

        exact = scores(curvature="exact")
        with mock.patch.object(influence, "dense_gauss_newton", block_diagonal):
            blockdiag = scores(curvature="exact")
        ekfac = scores(curvature="ekfac")
        row = [
            agree(exact, ekfac),
            agree(exact, scores(curvature="kfac")),
            agree(exact, scores(curvature="identity")),
            agree(exact, scores(curvature="ekfac", fisher_samples=args.draws)),
            agree(exact, blockdiag),
            agree(blockdiag, ekfac),
        ]
        print(f"{seed:>4}  " + "  ".join(f"{c:>16}" for c in row), flush=True)


if __name__ == "__main__":
    main()
