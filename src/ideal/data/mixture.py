"""Mixtures: how many copies of each unique example of each domain go into the training set.

A domain i is a pool of U_i unique examples; a mixture holds, per domain, a count of copies for each
pool example (repetition allowed), so the volume n_i is the sum of its counts. This module is pure: it
turns requested volumes into feasible integer volumes (`apply_constraints`) and moves a mixture to new
volumes by seeded, incremental resampling (`resample`), following docs/method.md "The update rule":

- downsampling removes random copies from the current multiset (every copy equally likely);
- upsampling adds copies of the least-repeated unique examples first, ties broken by the seeded RNG;
- no unique example ever gets more than `max_repeats` copies.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ideal.errors import IdealError


@dataclass(frozen=True)
class Constraints:
    """Bounds applied to requested volumes, in this order (docs/method.md)."""

    min_examples: int = 1  # at least this many examples per domain
    max_repeats: int = 4  # at most this many copies of any unique example (Muennighoff et al.)
    keep_total: bool = False  # rescale so that the total volume stays exactly the same

    def __post_init__(self) -> None:
        if self.min_examples < 0:
            raise IdealError(f"min_examples must be >= 0, got {self.min_examples}")
        if self.max_repeats < 1:
            raise IdealError(f"max_repeats must be >= 1, got {self.max_repeats}")


@dataclass
class Mixture:
    """Copies per unique pool example, per domain. `round` 0 is the original mixture D0."""

    counts: dict[str, np.ndarray]  # domain -> int64 array of length U_i
    seed: int = 0
    round: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)  # constraints that bound

    @classmethod
    def full(cls, pool_sizes: Mapping[str, int], seed: int = 0) -> Mixture:
        """Every pool example once: the data directory as given."""
        return cls({d: np.ones(u, dtype=np.int64) for d, u in pool_sizes.items()}, seed=seed)

    @property
    def domains(self) -> list[str]:
        return list(self.counts)

    @property
    def volumes(self) -> dict[str, int]:
        return {d: int(c.sum()) for d, c in self.counts.items()}

    @property
    def total(self) -> int:
        return sum(self.volumes.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "seed": self.seed,
            "total": self.total,
            "domains": {
                d: {
                    "volume": int(c.sum()),
                    "unique": int((c > 0).sum()),
                    "pool_size": len(c),
                    "max_repeats": int(c.max(initial=0)),
                    "counts": c.tolist(),
                }
                for d, c in self.counts.items()
            },
            "constraints_applied": self.events,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Mixture:
        counts = {}
        for domain, entry in obj["domains"].items():
            array = np.asarray(entry["counts"], dtype=np.int64)
            if array.ndim != 1 or (array < 0).any() or int(array.sum()) != entry["volume"]:
                raise IdealError(f"mixture: counts of domain '{domain}' do not match its volume")
            counts[domain] = array
        return cls(counts, seed=int(obj.get("seed", 0)), round=int(obj.get("round", 0)))


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _largest_remainder(
    values: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """Integers within [lo, hi] summing exactly to `total`, as close as possible to `values`."""
    out = np.clip(np.floor(values), lo, hi).astype(np.int64)
    remainder = values - out
    short = total - int(out.sum())
    order = np.argsort(-remainder, kind="stable")  # largest remainders first, ties by domain order
    while short != 0:
        step = 1 if short > 0 else -1
        candidates = order if step > 0 else order[::-1]
        moved = False
        for i in candidates:
            if short == 0:
                break
            if lo[i] <= out[i] + step <= hi[i]:
                out[i] += step
                short -= step
                moved = True
        if not moved:
            raise IdealError(f"cannot reach total {total} within the per-domain bounds")
    return out


def _scale_to_total(requested: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray) -> float:
    """The factor s with sum(clip(s * requested, lo, hi)) == total, by bisection (monotone in s)."""

    def mass(s: float) -> float:
        return float(np.clip(s * requested, lo, hi).sum())

    low, high = 0.0, 1.0
    while mass(high) < total:
        high *= 2.0
        if high > 1e18:
            break
    for _ in range(200):
        mid = 0.5 * (low + high)
        if mass(mid) < total:
            low = mid
        else:
            high = mid
    return high


def _event(
    domain: str | None, constraint: str, requested: float, volume: int, **extra: Any
) -> dict:
    return {
        "domain": domain,
        "constraint": constraint,
        "requested": requested,
        "volume": volume,
        **extra,
    }


def apply_constraints(
    requested: Mapping[str, float],
    pool_sizes: Mapping[str, int],
    constraints: Constraints,
    total: int | None = None,
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Requested real volumes -> feasible integer volumes, and the constraints that bound.

    Order (docs/method.md): at least `min_examples` per domain, at most `max_repeats` copies of any unique
    example, then optionally the exact `total` (rescale within those bounds, then largest-remainder
    rounding so that the sum is exact). Each binding constraint is returned as an event:
    {"domain", "constraint", "requested", "volume"}.
    """
    domains = list(requested)
    want = np.array([float(requested[d]) for d in domains])
    if not np.all(np.isfinite(want)) or (want < 0).any():
        raise IdealError(f"requested volumes must be finite and >= 0, got {dict(requested)}")
    hi = np.array([constraints.max_repeats * int(pool_sizes[d]) for d in domains], dtype=np.int64)
    lo = np.minimum(constraints.min_examples, hi)
    events: list[dict[str, Any]] = []
    if total is None:
        unbounded = np.array([_round_half_up(x) for x in want], dtype=np.float64)
        volumes = np.clip(unbounded, lo, hi).astype(np.int64)
    else:
        if not lo.sum() <= total <= hi.sum():
            raise IdealError(
                f"keep-total: total {total} is outside what the bounds allow "
                f"[{int(lo.sum())}, {int(hi.sum())}] (min_examples, max_repeats x pool size)"
            )
        scale = _scale_to_total(want, total, lo, hi)
        unbounded = scale * want
        volumes = _largest_remainder(np.clip(unbounded, lo, hi), total, lo, hi)
        if abs(want.sum() - total) > 0.5:
            events.append(_event(None, "keep_total", float(want.sum()), total, scale=scale))
    for i, domain in enumerate(domains):
        if unbounded[i] < lo[i]:
            events.append(_event(domain, "min_examples", float(want[i]), int(volumes[i])))
        elif unbounded[i] > hi[i]:
            events.append(_event(domain, "max_repeats", float(want[i]), int(volumes[i])))
    return {d: int(v) for d, v in zip(domains, volumes, strict=True)}, events


def domain_rng(seed: int, round_: int, domain: str) -> np.random.Generator:
    """The RNG of one domain in one round: independent of the other domains and of their order."""
    return np.random.default_rng([seed, round_, zlib.crc32(domain.encode("utf-8"))])


def resample(
    counts: np.ndarray, volume: int, max_repeats: int, rng: np.random.Generator
) -> np.ndarray:
    """Move one domain's copy counts to `volume` incrementally (see the module docstring)."""
    counts = np.minimum(np.asarray(counts, dtype=np.int64), max_repeats)  # a lowered cap binds now
    if volume > max_repeats * len(counts):
        raise IdealError(
            f"volume {volume} needs more than {max_repeats} copies of {len(counts)} unique examples"
        )
    current = int(counts.sum())
    if volume < current:
        copies = np.repeat(np.arange(len(counts)), counts)  # one entry per copy
        removed = rng.choice(len(copies), size=current - volume, replace=False)
        np.subtract.at(counts, copies[removed], 1)
    elif volume > current:
        tiebreak = rng.permutation(len(counts))
        missing = volume - current
        while missing > 0:
            level = counts[counts < max_repeats].min()
            at_level = np.flatnonzero(counts == level)
            chosen = at_level[np.argsort(tiebreak[at_level])][:missing]
            counts[chosen] += 1
            missing -= len(chosen)
    return counts


def draw_mixture(
    pool_sizes: Mapping[str, int], volumes: Mapping[str, int], max_repeats: int, seed: int
) -> Mixture:
    """Round 0: `volumes[d]` copies drawn from each domain's pool of `pool_sizes[d]` unique rows,
    by the same seeded incremental resampling as every later round (starting from no copies)."""
    counts = {
        d: resample(np.zeros(int(pool_sizes[d]), dtype=np.int64), int(v), max_repeats,
                    domain_rng(seed, 0, d))
        for d, v in volumes.items()
    }  # fmt: skip
    return Mixture(counts, seed=seed, round=0)


def resample_mixture(
    mixture: Mixture,
    volumes: Mapping[str, int],
    max_repeats: int,
    seed: int,
    events: list[dict[str, Any]] | None = None,
) -> Mixture:
    """The next round's mixture: each domain resampled to its new volume with its own seeded RNG."""
    round_ = mixture.round + 1
    counts = {
        d: resample(c, int(volumes[d]), max_repeats, domain_rng(seed, round_, d))
        for d, c in mixture.counts.items()
    }
    return Mixture(counts, seed=seed, round=round_, events=list(events or []))


# the stream of the search subsets' order: apart from every round's resampling (domain_rng)
_SEARCH_STREAM = 0x5EA2C4


def nested_subset(mixture: Mixture, fraction: float) -> Mixture:
    """The search recipe's rows of a round (`search.fraction`): per domain, round(fraction x n_i)
    copies (at least one of a non-empty domain), so the shares are kept.

    They are a prefix of a fixed order of the domain's pool, drawn once per (seed, domain): every
    pool row once in that order, then again (copies only past the pool's size). A round with a
    larger volume takes a longer prefix, so the rounds' subsets are nested, and two rounds at the
    same volume train on the same rows: the search compares mixtures, not samples. Which rows the
    round's own mixture holds does not enter: at a fraction of the volume, the search sees
    distinct rows where the mixture may repeat them."""
    if not 0.0 < fraction <= 1.0:
        raise IdealError(f"search.fraction must be in (0, 1], got {fraction}")
    counts = {}
    for domain, full in mixture.counts.items():
        pool, volume = len(full), int(full.sum())
        if not volume:
            counts[domain] = np.zeros(pool, dtype=np.int64)
            continue
        size = max(1, _round_half_up(fraction * volume))
        order = np.random.default_rng(
            [mixture.seed, _SEARCH_STREAM, zlib.crc32(domain.encode("utf-8"))]
        ).permutation(pool)
        rank = np.empty(pool, dtype=np.int64)
        rank[order] = np.arange(pool)  # position of each pool row in the order
        counts[domain] = size // pool + (rank < size % pool).astype(np.int64)
    return Mixture(counts, seed=mixture.seed, round=mixture.round)


def sample_counts(
    counts: np.ndarray, fraction: float, rng: np.random.Generator, cap: int | None = None
) -> np.ndarray:
    """A seeded sample of `fraction` of a domain's copies (at least one, at most `cap`), as counts
    per unique example.

    Copies of the same example have the same gradient, so a sampled example is processed once with
    its sampled count as weight.
    """
    if not 0.0 < fraction <= 1.0:
        raise IdealError(f"--sample must be in (0, 1], got {fraction}")
    if cap is not None and cap < 1:
        raise IdealError(f"--max-examples must be >= 1, got {cap}")
    counts = np.asarray(counts, dtype=np.int64)
    volume = int(counts.sum())
    size = max(1, math.ceil(fraction * volume))
    size = min(size, cap) if cap is not None else size
    if size >= volume or volume == 0:
        return counts.copy()
    copies = np.repeat(np.arange(len(counts)), counts)
    chosen = rng.choice(len(copies), size=size, replace=False)
    return np.bincount(copies[chosen], minlength=len(counts)).astype(np.int64)


def sample_mixture(
    counts: dict[str, np.ndarray], size: int | None, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """A seeded sample of `size` copies of the whole mixture (None: all of it), drawn without
    replacement, so each domain is represented in proportion to its volume; counts per example."""
    if size is not None and size < 1:
        raise IdealError(f"--curvature-examples must be >= 1 or 'all', got {size}")
    names = list(counts)
    arrays = [np.asarray(counts[n], dtype=np.int64) for n in names]
    total = int(sum(a.sum() for a in arrays))
    if size is None or size >= total:
        return {n: a.copy() for n, a in zip(names, arrays, strict=True)}
    flat = np.concatenate(arrays)
    copies = np.repeat(np.arange(len(flat)), flat)
    picked = np.bincount(copies[rng.choice(len(copies), size=size, replace=False)],
                         minlength=len(flat))  # fmt: skip
    bounds = np.cumsum([0, *(len(a) for a in arrays)])
    return {
        n: picked[lo:hi].astype(np.int64)
        for n, lo, hi in zip(names, bounds[:-1], bounds[1:], strict=True)
    }
