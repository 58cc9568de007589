"""The update's settings: `update:` of the run config and the options of `ideal reweight`, with
their defaults, choices and help (ideal.settings). No torch, no numpy: the CLI reads them at start.
"""

from __future__ import annotations

from dataclasses import dataclass

from ideal.errors import IdealError
from ideal.influence.settings import OBJECTIVES
from ideal.settings import check_choices, setting

RULES = ("ideal", "uniform", "temperature", "fixed", "doremi", "doge")
GEOMETRIES = ("relative", "additive")
FIRST_ROUNDS = ("ideal", "uniform")


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
        0.0,
        "Leave unchanged a domain whose sensitivity is within this many standard errors of 0 "
        "(0: off).",
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
        True,
        "Multiply domain i's sensitivity by n_i/N (docs/method.md; t_i/T, its share of target "
        "tokens, under the token objective).",
    )
    objective: str = setting(
        "mean",
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
        if not self.step > 0:
            raise IdealError(f"update.step must be > 0, got {self.step}")
        if self.max_repeats < 1:
            raise IdealError(f"update.max_repeats must be >= 1, got {self.max_repeats}")
        if self.geometry == "additive" and not self.size_factor:
            raise IdealError(
                "update.geometry additive takes the gradient in volumes, dQ/dn_i = alpha_i/n_i, "
                "which needs update.size_factor: true"
            )
