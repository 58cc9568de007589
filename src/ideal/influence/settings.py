"""The influence step's settings, one home each: `influence:` of the run config, the options of
`ideal influence`, and the API (`compute_influence`) read the same dataclasses (ideal.settings).

    InfluenceConfig     what to compute: curvature, damping, samples, layers, memory (each field
                        with its default, help and choices)
    InfluenceSettings   the engine's part of it, with the seed and the resolved loss
                        (InfluenceConfig.settings)
    InfluenceJob        one run of the step: the config, the seed, the resolved loss and how the
                        data are read and the objective is formed

No torch and no numpy here: the command line reads these at start-up. The sample sizes'
defaults were chosen from the measured accuracy-vs-cost curve (docs/results.md,
`benchmarks/influence_overhead.py --curve`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ideal.errors import IdealError
from ideal.settings import LOSSES, check_choices, default_of, setting

CURVATURES = ("ekfac", "kfac", "identity", "exact")
FISHERS = ("sampled", "empirical")
FACTORS = ("cpu", "device")
OBJECTIVES = ("mean", "pooled", "worst")  # Q over references (objective.objective_weights)
# update.objective and update.size_factor's defaults (ideal.methods.settings), which the influence
# job takes too: the update's settings live above this part, their defaults here
DEFAULT_OBJECTIVE = "mean"
DEFAULT_SIZE_FACTOR = True
DOMAIN_ROWS = {
    "mixture": "the domain's copies in the current mixture (docs/method.md's gbar_i)",
    "unseen": "the pool rows the mixture does not hold yet, which an increase adds first "
    "(the mixture's copies once every row is in it)",
}


@dataclass(frozen=True)
class InfluenceConfig:
    """`influence:` of the run config and the options of `ideal influence`."""

    curvature: str = setting(
        "ekfac",
        "ekfac (default), kfac, identity (plain gradient dot products) or exact (dense; tiny "
        "models).",
        choices=CURVATURES,
    )
    damping: float = setting(0.1, "Damping relative to each layer's mean eigenvalue.")
    damping_abs: float | None = setting(None, "Absolute damping (overrides --damping).")
    fisher: str = setting(
        "sampled",
        "Labels of the curvature's backward pass: sampled from the model (true Fisher) or the "
        "data's (empirical).",
        choices=FISHERS,
    )
    fisher_samples: int = setting(
        1,
        "Label draws per example for the sampled Fisher (less Monte Carlo noise, one backward "
        "each).",
    )
    sample: float = setting(
        0.5,
        "Fraction of each domain's copies its score is computed on (1.0 = all), capped by "
        "--max-examples.",
    )
    max_examples: int | None = setting(
        64, "At most this many copies per domain for its score ('all': no cap).", none="all"
    )
    curvature_examples: int | None = setting(
        128,
        "Copies of the mixture the curvature is fitted on, drawn in proportion to the volumes "
        "('all': every copy).",
        none="all",
    )
    memory: str | None = setting(
        None,
        "Device memory budget, e.g. 70GiB: layers are fitted in groups that fit it (one set of "
        "passes per group).",
    )
    layers: tuple[str, ...] | None = setting(
        None,
        "Comma-separated globs of linear-layer names (nn.Linear, GPT-2 Conv1D), e.g. "
        "'model.layers.*.mlp.*'. Default: every MLP projection (LoRA weights for a LoRA model).",
    )
    batch_size: int = setting(16, "Examples per forward pass.")
    factors: str = setting(
        "cpu",
        "Where covariances, eigenbases and gradient sums live: cpu (default; the device holds "
        "only the model and a batch) or device (no transfers, more device memory).",
        choices=FACTORS,
    )
    refine: int = setting(
        0,
        "Conjugate-gradient steps that refine the k reference directions toward the exact "
        "Gauss-Newton solution, preconditioned by EK-FAC (0: off; K steps cost K + 1 products, "
        "each about 2-3 forward+backward passes over the curvature sample per reference).",
    )
    domain_rows: str = setting(
        "mixture",
        "Whose gradient scores a domain: its copies in the mixture (docs/method.md), or the pool rows "
        "the mixture does not hold yet (what raising its volume adds first).",
        choices=tuple(DOMAIN_ROWS),
    )
    loss: str = setting(
        "auto",
        "The training objective to differentiate: example (mean of per-example mean NLLs; ideal "
        "train's default) or token (token mean over the set: TRL, LLaMA-Factory, axolotl). auto: "
        "what the trainer minimised (a run: train.backend; `ideal influence`: what the model "
        "directory's train_settings.json / train.json records, else example).",
        choices=("auto", *LOSSES),
    )

    def __post_init__(self) -> None:
        check_choices(self, "influence")
        if not 0.0 < self.sample <= 1.0:
            raise IdealError(f"influence.sample (--sample) must be in (0, 1], got {self.sample}")
        try:  # the engine's checks (damping, fisher samples, batch size, refine), with the key
            self.settings(0)
        except IdealError as err:
            message = str(err)
            flag = message.split()[0]  # "--batch-size"
            if flag.startswith("--"):
                key = f"influence.{flag.removeprefix('--').replace('-', '_')}"
                message = message.replace(flag, f"{key} ({flag})", 1)
            raise IdealError(message) from None

    def settings(self, seed: int, loss: str | None = None) -> InfluenceSettings:
        """The engine's settings; `loss` is the resolved objective (RunConfig.influence_loss
        resolves `auto` from the trainer); without it `auto` reads as example."""
        if loss is None:
            loss = "example" if self.loss == "auto" else self.loss
        return InfluenceSettings(
            curvature=self.curvature,
            damping=self.damping,
            damping_abs=self.damping_abs,
            fisher=self.fisher,
            batch_size=self.batch_size,
            seed=seed,
            fisher_samples=self.fisher_samples,
            factors=self.factors,
            refine=self.refine,
            loss=loss,
        )


@dataclass(frozen=True)
class InfluenceSettings:
    """What the engine (engine.domain_influence) needs: the curvature's settings, the seed of the
    sampled labels and the resolved objective. Built by InfluenceConfig.settings; its defaults
    are InfluenceConfig's (one home), `chunk` and `loss` its own."""

    curvature: str = default_of(InfluenceConfig, "curvature")  # ekfac | kfac | identity | exact
    damping: float = default_of(
        InfluenceConfig, "damping"
    )  # relative: lambda_l = damping x mean eigenvalue of layer l
    damping_abs: float | None = default_of(
        InfluenceConfig, "damping_abs"
    )  # absolute lambda, same for every layer (overrides damping)
    fisher: str = default_of(
        InfluenceConfig, "fisher"
    )  # sampled (true Fisher, seeded) | empirical (the data's labels)
    batch_size: int = default_of(InfluenceConfig, "batch_size")
    seed: int = 0
    chunk: int = 16  # examples per eigenvalue-correction chunk (bounds memory)
    fisher_samples: int = default_of(InfluenceConfig, "fisher_samples")
    factors: str = default_of(
        InfluenceConfig, "factors"
    )  # where the running sums live: cpu (device memory for the model) | device
    refine: int = default_of(
        InfluenceConfig, "refine"
    )  # conjugate-gradient steps toward the exact Gauss-Newton solution (refine.py)
    loss: str = "example"  # the training objective differentiated: example | token (docs/method.md)

    def __post_init__(self) -> None:
        if self.curvature not in CURVATURES:
            raise IdealError(
                f"--curvature must be one of {', '.join(CURVATURES)}, got {self.curvature!r}"
            )
        if self.fisher not in FISHERS:
            raise IdealError(f"--fisher must be sampled or empirical, got {self.fisher!r}")
        if self.damping_abs is None and not self.damping > 0:
            raise IdealError(f"--damping must be > 0, got {self.damping}")
        if self.damping_abs is not None and self.damping_abs < 0:
            raise IdealError(f"--damping-abs must be >= 0, got {self.damping_abs}")
        if self.fisher_samples < 1:
            raise IdealError(f"--fisher-samples must be >= 1, got {self.fisher_samples}")
        if self.factors not in FACTORS:
            raise IdealError(f"--factors must be cpu or device, got {self.factors!r}")
        if self.batch_size < 1:
            raise IdealError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.refine < 0:
            raise IdealError(f"--refine must be >= 0, got {self.refine}")
        if self.loss not in LOSSES:
            raise IdealError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.refine and self.curvature not in ("ekfac", "kfac"):
            raise IdealError(
                f"--refine needs --curvature ekfac or kfac (its preconditioner), got {self.curvature}"
            )


@dataclass(frozen=True)
class InfluenceJob:
    """One run of the influence step (step.compute_influence, step.probe_seconds): what to compute
    (`config`), the seed of the samples and of the sampled labels, the objective differentiated
    (`loss`, resolved: example | token; None: `config.loss`, auto read as example) and where it
    came from (`loss_source`, recorded in influence.json), how rows are read (`max_length`,
    `on_invalid`: error | skip), how the sensitivities combine the references (`objective`:
    mean | pooled | worst; `size_factor`: multiply by n_i/N, docs/method.md), and which blocks
    trained (`top_layers`, `feature_cache`: as train.* says)."""

    config: InfluenceConfig = InfluenceConfig()
    seed: int = 0
    loss: str | None = None
    loss_source: str | None = None
    max_length: int | None = None
    objective: str = DEFAULT_OBJECTIVE
    size_factor: bool = DEFAULT_SIZE_FACTOR
    on_invalid: str = "error"
    # train.top_layers / train.feature_cache: the influence layers lie in the top blocks (the
    # default layers are restricted to them) and their passes run from the cached features
    top_layers: int = 0
    feature_cache: bool = True

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise IdealError(f"objective must be mean, pooled or worst, got {self.objective!r}")
        self.config.settings(self.seed, self.loss)  # the engine's checks, the loss's included

    @property
    def settings(self) -> InfluenceSettings:
        """The engine's settings of this job (its seed, its loss resolved)."""
        return self.config.settings(self.seed, self.loss)

    @property
    def layers(self) -> list[str] | None:
        """The layer patterns as the engine takes them (None: every MLP projection)."""
        return list(self.config.layers) if self.config.layers else None
