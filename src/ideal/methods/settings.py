"""The update's settings: `update:` of the run config and the options of `ideal reweight`, with
their defaults, choices and help (ideal.settings). No torch, no numpy: the CLI reads them at start.
"""

from __future__ import annotations

from dataclasses import dataclass

from ideal.errors import IdealError
from ideal.influence.settings import DEFAULT_OBJECTIVE, DEFAULT_SIZE_FACTOR, OBJECTIVES
from ideal.settings import check_choices, setting

RULES = ("ideal", "uniform", "temperature", "fixed", "doremi", "doge")
GEOMETRIES = ("relative", "additive")
FIRST_ROUNDS = ("ideal", "uniform")
SHRINKS = ("soft", "gate")  # how a sensitivity is judged by its standard error (rules.noise_aware)
TIES = ("smaller", "larger", "lowest")  # which of the candidates within one paired SE is kept


@dataclass(frozen=True)
class UpdateSettings:
    """How round K+1's volumes follow from round K (docs/method.md "The update")."""

    rule: str = setting("ideal", "The update rule.", choices=RULES)
    temperature: float = setting(2.0, "rule temperature: volumes ~ pool size ** (1 / T).")
    shares: dict[str, float] = setting(factory=dict, help="rule fixed: domain -> share.")
    step: float = setting(0.15, "m: the largest relative change of a domain's volume per round.")
    geometry: str = setting(
        "relative",
        "relative: beta = -m alpha/max|alpha| (docs/method.md); additive: a step in volumes, the "
        "largest change m x the mean volume (docs/method-additions.md).",
        choices=GEOMETRIES,
    )
    min_z: float = setting(
        2.0,
        "Noise: a sensitivity within this many standard errors of 0 moves nothing, a stronger "
        "one is shrunk by as many (update.shrink); 0: every sensitivity as measured (the paper).",
        before=0.0,
    )
    shrink: str = setting(
        "soft",
        "soft: |alpha_i| minus min_z standard errors, at least 0 (a soft threshold on z); gate: "
        "alpha_i kept whole beyond min_z standard errors, 0 within.",
        choices=SHRINKS,
        before="gate",
    )
    # default since 2026-12-05 (fresh seeds 10-14 of the four toys, docs/results.md)
    rescore: bool = setting(
        True,
        "When update.min_z leaves no sensitivity (every one within its noise) on a sample that "
        "influence.max_examples capped, score every copy of each domain's influence sample and "
        "step from that: one more influence pass, no training.",
        before=False,
    )
    candidates: tuple[float, ...] = setting(
        (0.15, 0.4, 0.75),
        "Steps m trained along the direction at each IDEAL update (the radius scales them); "
        "the best on held-out reference rows is kept. Empty: one step of update.step (the paper).",
        before=(),
    )
    selection: float = setting(
        0.5,
        "Fraction of each capability's reference rows held out from the direction, on which the "
        "candidates are compared (0: the rows that computed the direction).",
        before=0.0,
    )
    ties: str = setting(
        "lowest",
        "Which candidate is kept: the lowest held-out loss, separated or not (lowest); or among "
        "those within one paired standard error of it, the smaller step or the larger.",
        choices=TIES,
    )
    surrogate: bool = setting(
        False,
        "Train one more candidate: the minimiser, inside the radius, of a quadratic in "
        "log-volumes fitted to every trained mixture's reference loss and the influence "
        "sensitivities.",
    )
    trust_region: bool = setting(
        False, "Double m after a round that lowered Q, else start again from the best round."
    )
    max_step: float = setting(0.9, "trust_region: the largest m.")
    # The probe became the default after 4 suites x 5 seeds (docs/results.md, "mixture quality");
    # a run started before the option existed took docs/method.md's step ("before").
    first_round: str = setting(
        "uniform",
        "uniform: round 1 is the uniform mixture at D0's total (a probe), and the IDEAL updates "
        "start from whichever of D0 and round 1 has the lower mean reference loss; ideal: "
        "docs/method.md's step from D0.",
        choices=FIRST_ROUNDS,
        before="ideal",
    )
    max_repeats: int = setting(4, "At most this many copies of any unique example.")
    min_examples: int = setting(1, "At least this many examples per domain.")
    keep_total: bool = setting(True, "Keep the total number of examples exactly the same.")
    size_factor: bool = setting(
        DEFAULT_SIZE_FACTOR,
        "Multiply domain i's sensitivity by n_i/N (docs/method.md; t_i/T, its share of target "
        "tokens, under the token objective).",
    )
    objective: str = setting(
        DEFAULT_OBJECTIVE,
        "Q over capabilities: mean of per-capability losses, pooled examples, or the worst "
        "capability.",
        choices=OBJECTIVES,
    )
    proxy_steps: int | None = setting(
        None, "doremi/doge: proxy run steps (default: the training's steps)."
    )
    proxy_eta: float = setting(1.0, "doremi/doge: step size of the domain-weight update.")
    proxy_smoothing: float = setting(1e-3, "doremi: smoothing toward uniform (the paper's c).")

    def __post_init__(self) -> None:
        check_choices(self, "update")
        if not 0 < self.step < 1:
            raise IdealError(
                f"update.step must be in (0, 1): m is the largest relative change, got {self.step}"
            )
        if not 0 < self.max_step < 1:
            raise IdealError(f"update.max_step must be in (0, 1), got {self.max_step}")
        if any(not 0 < m < 1 for m in self.candidates):
            raise IdealError(
                f"update.candidates must each be in (0, 1), got {list(self.candidates)}"
            )
        if len({round(m, 3) for m in self.candidates}) != len(self.candidates):
            raise IdealError(
                f"update.candidates: two steps within 0.001 of each other in "
                f"{list(self.candidates)} (they name one candidate)"
            )
        if self.surrogate and not self.size_factor:
            raise IdealError(
                "update.surrogate takes the sensitivities as dQ/dlog n_i, which needs "
                "update.size_factor: true"
            )
        if not 0 <= self.selection < 1:
            raise IdealError(f"update.selection must be in [0, 1), got {self.selection}")
        if self.min_z < 0:
            raise IdealError(f"update.min_z must be >= 0, got {self.min_z}")
        if self.trust_region and self.candidates:
            raise IdealError(
                "update.trust_region steers one step of update.step from round to round; with "
                "update.candidates the steps are measured and their radius follows them: set "
                "update.candidates: [] to use the trust region"
            )
        if self.max_repeats < 1:
            raise IdealError(f"update.max_repeats must be >= 1, got {self.max_repeats}")
        if self.geometry == "additive" and not self.size_factor:
            raise IdealError(
                "update.geometry additive takes the gradient in volumes, dQ/dn_i = alpha_i/n_i, "
                "which needs update.size_factor: true"
            )
