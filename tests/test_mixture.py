"""Constraints and seeded incremental resampling (docs/method.md "The update rule")."""

from __future__ import annotations

import numpy as np
import pytest

from ideal.data.mixture import (
    Constraints,
    Mixture,
    apply_constraints,
    domain_rng,
    draw_mixture,
    resample,
    resample_mixture,
)
from ideal.errors import IdealError


def test_rounding_without_constraints_that_bind():
    volumes, events = apply_constraints(
        {"a": 114.5, "b": 85.4}, {"a": 100, "b": 100}, Constraints()
    )
    assert volumes == {"a": 115, "b": 85}
    assert events == []


def test_min_examples_and_max_repeats_bind_and_are_reported():
    volumes, events = apply_constraints(
        {"a": 2.2, "b": 500.0, "c": 40.0}, {"a": 10, "b": 100, "c": 50}, Constraints(5, 3)
    )
    assert volumes == {"a": 5, "b": 300, "c": 40}
    assert [(e["domain"], e["constraint"], e["volume"]) for e in events] == [
        ("a", "min_examples", 5),
        ("b", "max_repeats", 300),
    ]


def test_keep_total_is_exact_with_largest_remainder():
    # 3 domains, requested 1:1:1 of a total of 100 -> 33.33 each; largest remainder gives 34/33/33
    volumes, events = apply_constraints(
        {"a": 10.0, "b": 10.0, "c": 10.0}, {"a": 50, "b": 50, "c": 50}, Constraints(), total=100
    )
    assert volumes == {"a": 34, "b": 33, "c": 33}
    assert events[0]["constraint"] == "keep_total" and events[0]["volume"] == 100


def test_keep_total_respects_the_caps_and_redistributes():
    # b wants 3/4 of 200 = 150, but its cap is 2 x 40 = 80: the rest goes to a and c in proportion
    volumes, events = apply_constraints(
        {"a": 10.0, "b": 60.0, "c": 10.0},
        {"a": 100, "b": 40, "c": 100},
        Constraints(1, 2),
        total=200,
    )
    assert volumes == {"a": 60, "b": 80, "c": 60}
    assert ("b", "max_repeats") in [(e["domain"], e["constraint"]) for e in events]


def test_keep_total_exact_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 7))
        sizes = {f"d{i}": int(rng.integers(1, 60)) for i in range(n)}
        requested = {d: float(rng.uniform(0.1, 300)) for d in sizes}
        c = Constraints(int(rng.integers(0, 3)), int(rng.integers(1, 5)))
        lo = sum(min(c.min_examples, c.max_repeats * u) for u in sizes.values())
        hi = sum(c.max_repeats * u for u in sizes.values())
        total = int(rng.integers(lo, hi + 1))
        volumes, _ = apply_constraints(requested, sizes, c, total=total)
        assert sum(volumes.values()) == total
        for d, v in volumes.items():
            assert min(c.min_examples, c.max_repeats * sizes[d]) <= v <= c.max_repeats * sizes[d]


def test_infeasible_total_is_a_clear_error():
    with pytest.raises(IdealError, match="outside what the bounds allow"):
        apply_constraints({"a": 1.0}, {"a": 10}, Constraints(1, 2), total=21)


def test_downsampling_removes_copies_only():
    counts = np.array([3, 0, 1, 2, 4, 1])
    new = resample(counts, 6, 4, np.random.default_rng(1))
    assert new.sum() == 6 and (new <= counts).all()


def test_upsampling_fills_the_least_repeated_first():
    counts = np.array([0, 0, 3, 1])
    new = resample(counts, 7, 4, np.random.default_rng(0))
    # both zeros rise to 1 (2 copies), then one of the three examples at level 1 gets the last copy
    assert new.sum() == 7 and new[2] == 3
    assert sorted(new[[0, 1, 3]].tolist()) == [1, 1, 2]


def test_upsampling_never_exceeds_max_repeats():
    new = resample(np.array([1, 1, 1]), 9, 3, np.random.default_rng(0))
    assert new.tolist() == [3, 3, 3]
    with pytest.raises(IdealError, match="more than 3 copies"):
        resample(np.array([1, 1, 1]), 10, 3, np.random.default_rng(0))


def test_resampling_is_deterministic_for_a_seed_and_varies_with_it():
    counts = np.ones(50, dtype=np.int64)
    a = resample(counts, 31, 4, domain_rng(7, 1, "math"))
    b = resample(counts, 31, 4, domain_rng(7, 1, "math"))
    c = resample(counts, 31, 4, domain_rng(8, 1, "math"))
    assert (a == b).all() and not (a == c).all()


def test_rounds_are_incremental():
    mixture = Mixture.full({"math": 40, "code": 30}, seed=3)
    down = resample_mixture(mixture, {"math": 25, "code": 45}, 4, seed=3)
    assert down.round == 1 and down.volumes == {"math": 25, "code": 45}
    assert (down.counts["math"] <= mixture.counts["math"]).all()  # only removed
    assert (down.counts["code"] >= mixture.counts["code"]).all()  # only added
    up = resample_mixture(down, {"math": 40, "code": 45}, 4, seed=3)
    # the examples dropped in round 1 are the least repeated, so they come back first
    assert (up.counts["math"] == 1).all()
    assert (up.counts["code"] == down.counts["code"]).all()


def test_round_zero_draw_is_seeded_and_per_domain():
    sizes = {"math": 40, "code": 30}
    d0 = draw_mixture(sizes, {"math": 100, "code": 12}, 4, seed=5)
    assert d0.round == 0 and d0.seed == 5 and d0.volumes == {"math": 100, "code": 12}
    assert (d0.counts["math"] >= 2).all() and d0.counts["math"].max() == 3  # spread evenly
    assert ((d0.counts["code"] == 0) | (d0.counts["code"] == 1)).all()
    # a domain's draw depends on the seed and its own name only, never on the other domains
    alone = draw_mixture({"code": 30}, {"code": 12}, 4, seed=5)
    assert (alone.counts["code"] == d0.counts["code"]).all()
    other = draw_mixture(sizes, {"math": 100, "code": 12}, 4, seed=6)
    assert not (other.counts["code"] == d0.counts["code"]).all()


def test_mixture_round_trips_through_its_dict():
    mixture = resample_mixture(Mixture.full({"a": 5, "b": 3}), {"a": 7, "b": 2}, 4, seed=1)
    again = Mixture.from_dict(mixture.to_dict())
    assert again.volumes == mixture.volumes and again.round == 1 and again.seed == 1
    assert all((again.counts[d] == mixture.counts[d]).all() for d in mixture.counts)
    entry = mixture.to_dict()["domains"]["a"]
    assert (entry["volume"], entry["unique"], entry["pool_size"], entry["max_repeats"]) == (
        7,
        5,
        5,
        2,
    )
