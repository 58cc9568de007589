"""Update rules: signals about the current mixture -> requested volumes for the next round.

The IDEAL rule (docs/method.md "The update rule"), with the sign convention used everywhere in `ideal`:
s_ji > 0 means "training more on domain i is predicted to LOWER the loss on reference j".

    dQ/dbeta_i = -(n_i / N) * sum_j w_j s_ji          (ideal.influence.objective.sensitivities)
    beta       = -m * alpha / max_i |alpha_i|         (alpha = dQ/dbeta; the largest change is m)
    n_i       <- n_i * (1 + beta_i)                   (then constraints, in `ideal.data.mixture`)

With `geometry="additive"` (docs/method-additions.md) the step is taken in volumes, not in beta:

    g_i  = alpha_i / n_i                              (dQ/dn_i; minus its mean when the total is kept)
    dn_i = -m * (N/K) * g_i / max_i |g_i|             (the largest change is m times the mean volume)
    n_i <- max(n_i + dn_i, (1 - m) n_i)               (no domain loses more than m of its volume)

A rule is a small object with a name, the signal it needs, and `propose`: "influence" (the
influence step), "proxy" (a proxy run that learns domain weights online: DoReMi, DoGE) or "none", so
rules that need no influence let the loop skip that step.

DoReMi (Xie et al., 2023) and DoGE (Fan et al., 2024) learn domain weights alpha on the simplex while a
proxy model trains; the per-step updates are pure functions here, the proxy run is `ideal.methods.proxy`:

    DoReMi   alpha <- (1 - c) softmax(log alpha + eta * lambda) + c / k     lambda: clipped excess loss
    DoGE     alpha <- softmax(log alpha + eta * W)                           W: gradient alignment
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ideal.errors import IdealError
from ideal.methods.settings import SHRINKS, UpdateSettings


def ideal_beta(sensitivity: Sequence[float], step: float) -> np.ndarray:
    """beta = -m * alpha / max|alpha|: move against the gradient, the largest change being `step`.

    All-zero sensitivities (nothing to gain) give beta = 0.
    """
    if not 0.0 < step < 1.0:
        raise IdealError(f"step m must be in (0, 1), got {step}")
    alpha = np.asarray(sensitivity, dtype=np.float64)
    if not np.all(np.isfinite(alpha)):
        raise IdealError(f"sensitivities must be finite, got {alpha.tolist()}")
    largest = np.abs(alpha).max(initial=0.0)
    if largest == 0.0:
        return np.zeros_like(alpha)
    return -step * alpha / largest


def additive_delta(
    sensitivity: Sequence[float], volumes: Sequence[float], step: float, centred: bool = True
) -> np.ndarray:
    """dn = -m (N/K) g / max|g| with g_i = alpha_i / n_i = dQ/dn_i: a step in volumes.

    docs/method.md's beta = -m alpha / max|alpha| moves a domain by n_i beta_i, proportional to
    n_i^2 s_i once the size factor is in alpha: a scarce domain barely moves whatever its
    scores. The gradient in volumes, g_i = dQ/dn_i, moves every domain by its own per-example
    signal. `centred` subtracts the mean of g (the projection on sum_i dn_i = 0, for a kept
    total). The largest |dn_i| is m times the mean volume N/K; all-zero g gives dn = 0.
    """
    if not 0.0 < step < 1.0:
        raise IdealError(f"step m must be in (0, 1), got {step}")
    alpha = np.asarray(sensitivity, dtype=np.float64)
    n = np.asarray(volumes, dtype=np.float64)
    if not np.all(np.isfinite(alpha)):
        raise IdealError(f"sensitivities must be finite, got {alpha.tolist()}")
    if alpha.shape != n.shape or not np.all(n > 0):
        raise IdealError(f"volumes must be > 0, one per sensitivity, got {n.tolist()}")
    g = alpha / n
    if centred:
        g = g - g.mean()
    largest = np.abs(g).max(initial=0.0)
    if largest == 0.0:
        return np.zeros_like(g)
    return -step * (n.sum() / len(n)) * g / largest


class Rule(Protocol):
    """Requested (real-valued) volumes for the next round; constraints are applied afterwards."""

    name: str
    signal: str  # "influence" | "proxy" | "none": what `propose` reads from `signals`

    def propose(
        self, volumes: Mapping[str, int], signals: Mapping[str, Any]
    ) -> dict[str, float]: ...


def noise_aware(
    sensitivity: Sequence[float], stderr: Sequence[float] | None, min_z: float, shrink: str
) -> np.ndarray:
    """The sensitivities the step uses, each judged by its own standard error.

    soft (default): alpha_i -> sign(alpha_i) max(|alpha_i| - min_z se_i, 0), a soft threshold on
        z = |alpha_i| / se_i: an entry within min_z standard errors of 0 contributes nothing, a
        strong one is shrunk by its noise, so the noisiest entry cannot lead the step;
    gate: the entries within min_z standard errors are set to 0, the others kept whole.

    min_z = 0, or no standard errors, leaves the sensitivities as they are (the paper's step).
    An entry whose standard error is 0 (a domain scored on a single batch) is kept whole."""
    if shrink not in SHRINKS:
        raise IdealError(f"update.shrink must be one of {', '.join(SHRINKS)}, got {shrink!r}")
    alpha = np.asarray(sensitivity, dtype=np.float64)
    if stderr is None or min_z <= 0:
        return alpha
    se = np.asarray(stderr, dtype=np.float64)
    if se.shape != alpha.shape or not np.all(np.isfinite(se)) or np.any(se < 0):
        raise IdealError(f"sensitivity standard errors must be finite and >= 0, got {se.tolist()}")
    margin = min_z * se
    if shrink == "gate":
        return np.where(np.abs(alpha) < margin, 0.0, alpha)
    return np.sign(alpha) * np.maximum(np.abs(alpha) - margin, 0.0) + 0.0  # no -0.0


def direction_table(
    signals: Mapping[str, Any], update: UpdateSettings, domains: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """Per domain: the sensitivity, its standard error, z = |alpha| / se, and what the step used
    (`noise_aware`): influence.json's `direction`, the console's and the report's table."""
    alpha = [float(signals["sensitivity"][d]) for d in domains]
    errors = signals.get("sensitivity_stderr")
    se = [float(errors[d]) for d in domains] if errors else None
    used = noise_aware(alpha, se, update.min_z, update.shrink)
    out: dict[str, dict[str, float | None]] = {}
    for i, d in enumerate(domains):
        error = None if se is None else se[i]
        z = None if not error else abs(alpha[i]) / error
        out[d] = {"sensitivity": alpha[i], "stderr": error, "z": z, "used": float(used[i])}
    return out


def moves_nothing(signals: Mapping[str, Any], update: UpdateSettings) -> bool:
    """Whether the noise leaves no sensitivity for the step (`noise_aware`: every entry within
    update.min_z standard errors of 0): what `update.rescore` answers with every copy's score."""
    table = direction_table(signals, update, list(signals["sensitivity"]))
    return all(row["used"] == 0.0 for row in table.values())


@dataclass(frozen=True)
class IdealRule:
    """The IDEAL step from `signals["sensitivity"]` (domain -> dQ/dbeta_i), with `update`'s
    settings (one home: ideal.methods.settings.UpdateSettings) and step m (`step`, default
    update.step; a candidate's own m).

    Each sensitivity is first judged by its standard error (`signals["sensitivity_stderr"]`,
    `noise_aware`: update.min_z, update.shrink); the normalisation runs over what survives.
    `update.geometry` "relative" is docs/method.md's beta step; "additive" the step in volumes
    (`additive_delta`, centred when keep_total; a domain loses at most m of its volume)."""

    update: UpdateSettings = UpdateSettings()
    step: float | None = None
    name: str = "ideal"
    signal: str = "influence"

    @property
    def m(self) -> float:
        return self.update.step if self.step is None else self.step

    def used(self, volumes: Mapping[str, int], signals: Mapping[str, Any]) -> list[float]:
        """The sensitivities the step uses, in the order of `volumes`."""
        table = direction_table(signals, self.update, list(volumes))
        return [table[d]["used"] or 0.0 for d in volumes]

    def held(self, signals: Mapping[str, Any]) -> list[str]:
        """Domains the noise leaves unchanged (their sensitivity contributes nothing)."""
        if self.update.min_z <= 0 or not signals.get("sensitivity_stderr"):
            return []
        table = direction_table(signals, self.update, list(signals["sensitivity"]))
        return [d for d, row in table.items() if row["used"] == 0.0 and row["sensitivity"] != 0.0]

    def propose(self, volumes: Mapping[str, int], signals: Mapping[str, Any]) -> dict[str, float]:
        domains = list(volumes)
        used = self.used(volumes, signals)
        if self.update.geometry == "additive":
            moving = [d for d, a in zip(domains, used, strict=True) if a != 0.0]
            delta = dict.fromkeys(domains, 0.0)
            if moving:
                alpha = [used[domains.index(d)] for d in moving]
                steps = additive_delta(
                    alpha, [volumes[d] for d in moving], self.m, self.update.keep_total
                )
                delta.update(zip(moving, steps.tolist(), strict=True))
            return {d: max(volumes[d] + delta[d], (1.0 - self.m) * volumes[d]) for d in domains}
        beta = ideal_beta(used, self.m)
        return {d: volumes[d] * (1.0 + b) for d, b in zip(domains, beta, strict=True)}


@dataclass(frozen=True)
class UniformRule:
    """The same volume for every domain, at the same total."""

    name: str = "uniform"
    signal: str = "none"

    def propose(self, volumes: Mapping[str, int], signals: Mapping[str, Any]) -> dict[str, float]:
        total = sum(volumes.values())
        return {d: total / len(volumes) for d in volumes}


@dataclass(frozen=True)
class TemperatureRule:
    """Volumes proportional to pool size ** (1 / T), at the same total (T = 1: proportional)."""

    temperature: float = 2.0
    name: str = "temperature"
    signal: str = "none"

    def propose(self, volumes: Mapping[str, int], signals: Mapping[str, Any]) -> dict[str, float]:
        if not self.temperature > 0:
            raise IdealError(f"temperature must be > 0, got {self.temperature}")
        sizes = signals["pool_sizes"]
        weights = {d: float(sizes[d]) ** (1.0 / self.temperature) for d in volumes}
        total, norm = sum(volumes.values()), sum(weights.values())
        return {d: total * w / norm for d, w in weights.items()}


@dataclass(frozen=True)
class FixedRule:
    """Given volumes, rescaled to the current total (e.g. one random mixture on the simplex)."""

    shares: tuple[tuple[str, float], ...]  # (domain, share); shares need not sum to 1
    name: str = "fixed"
    signal: str = "none"

    def propose(self, volumes: Mapping[str, int], signals: Mapping[str, Any]) -> dict[str, float]:
        shares = dict(self.shares)
        if (
            set(shares) != set(volumes)
            or not all(v >= 0 for v in shares.values())
            or sum(shares.values()) <= 0
        ):
            raise IdealError(
                f"fixed mixture: shares {shares} do not match the domains {sorted(volumes)}"
            )
        total, norm = sum(volumes.values()), sum(shares.values())
        return {d: total * shares[d] / norm for d in volumes}


def random_shares(
    domains: Sequence[str], rng: np.random.Generator
) -> tuple[tuple[str, float], ...]:
    """A uniformly random point of the simplex over the domains (Dirichlet(1, ..., 1))."""
    return tuple(zip(domains, rng.dirichlet(np.ones(len(domains))).tolist(), strict=True))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def _log(weights: np.ndarray) -> np.ndarray:
    """log of weights on the simplex; a weight that underflowed to 0 stays (numerically) 0."""
    return np.log(np.maximum(weights, 1e-300))


def _check_weights(alpha: Sequence[float], signal: Sequence[float], what: str) -> tuple:
    a, x = np.asarray(alpha, dtype=np.float64), np.asarray(signal, dtype=np.float64)
    if a.shape != x.shape or a.ndim != 1 or not np.all(a >= 0) or abs(a.sum() - 1.0) > 1e-9:
        raise IdealError(f"domain weights must be non-negative and sum to 1, got {a.tolist()}")
    if not np.all(np.isfinite(x)):
        raise IdealError(f"{what} must be finite, got {x.tolist()}")
    return a, x


def doremi_step(
    alpha: Sequence[float], excess: Sequence[float], eta: float = 1.0, smoothing: float = 1e-3
) -> np.ndarray:
    """One DoReMi update (Xie et al. 2023, Algorithm 1): exponentiated gradient on the per-domain
    clipped excess loss lambda_i, renormalised, then smoothed toward uniform by `smoothing` (c)."""
    a, x = _check_weights(alpha, excess, "excess losses")
    if not 0.0 <= smoothing <= 1.0:
        raise IdealError(f"DoReMi smoothing must be in [0, 1], got {smoothing}")
    return (1.0 - smoothing) * _softmax(_log(a) + eta * x) + smoothing / len(a)


def doge_step(alpha: Sequence[float], alignment: Sequence[float], eta: float = 1.0) -> np.ndarray:
    """One DoGE update (Fan et al. 2024): mirror descent (multiplicative weights) on the simplex,
    each domain's weight moved by eta x W_i, W_i the first-order decrease of the target (reference)
    loss from a step on domain i (its gradient's alignment with the reference gradient)."""
    a, x = _check_weights(alpha, alignment, "alignments")
    return _softmax(_log(a) + eta * x)


@dataclass(frozen=True)
class ProxyRule:
    """Volumes from the average domain weights of a proxy run (`signals["weights"]`), same total."""

    method: str  # doremi | doge
    signal: str = "proxy"

    @property
    def name(self) -> str:
        return self.method

    def propose(self, volumes: Mapping[str, int], signals: Mapping[str, Any]) -> dict[str, float]:
        weights = signals["weights"]
        return FixedRule(tuple((d, float(weights[d])) for d in volumes)).propose(volumes, {})


def requested_change(rule: Rule, signals: Mapping[str, Any]) -> dict[str, float]:
    """The relative change of each domain's volume that `rule` asks for from influence.json's
    `signals` (its `volumes` and sensitivities), before constraints and resampling: the `beta`
    influence.json carries at the step the run takes."""
    volumes = signals["volumes"]
    requested = rule.propose(volumes, signals)
    return {d: requested[d] / volumes[d] - 1.0 if volumes[d] else 0.0 for d in volumes}
