"""Where the noise of the influence scores comes from: the domain samples or the curvature sample.

    python benchmarks/influence_noise.py [--draws 20] [--threads 1]

On the toy problem of the tests (a tiny Llama trained briefly on 3 domains of 40 examples, weights
1-2 copies, 3 references), EK-FAC with the sampled Fisher:

- domain samples re-drawn (half of each domain, different seeds), curvature held fixed (the whole
  mixture): the reported standard error against the spread of the scores over the draws;
- curvature sample re-drawn (C copies of the mixture, different seeds), domain samples held fixed
  (the whole domains, so no sampling error): the spread of the scores, relative to the standard
  error of the default domain sample, for several C.

Prints one table per part; ratios near 1 in the first mean the standard errors are honest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import toy_influence_problem  # noqa: E402

from ideal.data.mixture import sample_counts, sample_mixture  # noqa: E402
from ideal.influence.capture import select_layers  # noqa: E402
from ideal.influence.engine import domain_influence  # noqa: E402
from ideal.influence.results import WeightedSet  # noqa: E402
from ideal.influence.settings import InfluenceSettings  # noqa: E402


def subset(ws: WeightedSet, counts: np.ndarray, population: float | None) -> WeightedSet:
    keep = np.flatnonzero(counts)
    return WeightedSet([ws.items[i] for i in keep], [float(counts[i]) for i in keep],
                       population=population)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, domains, references = toy_influence_problem()
    layers = select_layers(model)
    settings = InfluenceSettings(batch_size=16)
    counts = {d: np.array(ws.weights, dtype=np.int64) for d, ws in domains.items()}
    whole = WeightedSet.merged(domains)

    def domain_draw(seed: int) -> dict[str, WeightedSet]:
        return {
            d: subset(
                ws,
                sample_counts(counts[d], 0.5, np.random.default_rng([seed, k])),
                float(counts[d].sum()),
            )  # fmt: skip
            for k, (d, ws) in enumerate(domains.items())
        }

    runs = [domain_influence(model, layers, domain_draw(s), references, settings, 0,
                             curvature=whole) for s in range(args.draws)]  # fmt: skip
    spread = np.std([r.scores for r in runs], axis=0, ddof=1)
    stderr = np.mean([r.stderr for r in runs], axis=0)
    print(f"domain samples (half of each domain), {args.draws} draws, curvature fixed (all "
          f"{int(sum(whole.weights))} copies):")  # fmt: skip
    print(f"  reported stderr / spread over draws: median {np.median(stderr / spread):.2f}, "
          f"range {np.min(stderr / spread):.2f}-{np.max(stderr / spread):.2f}")  # fmt: skip
    print("curvature sample re-drawn, domains fixed (whole): spread of the scores / default stderr")
    total = int(sum(whole.weights))
    for size in (16, 32, 64, total):
        scores = []
        for s in range(args.draws if size < total else 1):
            drawn = sample_mixture(counts, size, np.random.default_rng([s, 23]))
            parts = [subset(domains[d], drawn[d], None) for d in domains]
            curvature = WeightedSet([i for p in parts for i in p.items],
                                    [w for p in parts for w in p.weights])  # fmt: skip
            curvature.keys = list(range(len(curvature.items)))
            result = domain_influence(model, layers, domains, references, settings, 0,
                                      curvature=curvature)  # fmt: skip
            scores.append(result.scores)
        if size < total:
            ratio = np.std(scores, axis=0, ddof=1) / stderr
            print(f"  C = {size:4d} copies: median {np.median(ratio):.2f}, max {np.max(ratio):.2f}")
        else:
            print(f"  C = all ({total}): deterministic (no re-draw)")


if __name__ == "__main__":
    main()
