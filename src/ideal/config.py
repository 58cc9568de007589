"""Run configuration: dataclasses loaded from YAML, `key=value` overrides, validation, a stable hash.

    ideal run CONFIG.yaml [key=value ...]     e.g.  rounds=3 update.step=0.3 train.lr=1e-3

A config names either the embedded suite (`suite:`, generated into the run directory) or the user's
own `model`, `train`, `reference` and `test` directories. Unknown keys are errors naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ideal.artifacts import sha256_text
from ideal.backends.train import TrainSettings
from ideal.data.suite import SuiteConfig
from ideal.errors import IdealError
from ideal.influence.defaults import CURVATURE_EXAMPLES, MAX_EXAMPLES, SAMPLE
from ideal.influence.engine import InfluenceSettings
from ideal.lm import LOSSES
from ideal.methods.rules import GEOMETRIES
from ideal.methods.select import SELECTIONS

REFERENCE_ACCURACY = ("auto", "always", "never")
FIRST_ROUNDS = ("ideal", "uniform")  # update.first_round


@dataclass(frozen=True)
class UpdateSettings:
    rule: str = "ideal"  # ideal | uniform | temperature | fixed | doremi | doge
    temperature: float = 2.0  # for rule = temperature: volumes ~ pool size ** (1 / T)
    shares: dict[str, float] = field(default_factory=dict)  # for rule = fixed: domain -> share
    step: float = 0.15  # m: the largest relative change of a domain's volume per round
    # ideal: the step in beta (relative, METHOD.md) or in volumes (additive: the largest change is
    # m x the mean volume; docs/method-additions.md)
    geometry: str = "relative"
    min_z: float = 0.0  # ideal: hold domains whose sensitivity is within min_z standard errors of 0
    trust_region: bool = False  # ideal: double m after a round that lowered Q, else back off
    max_step: float = 0.9  # ideal with trust_region: the largest m
    # ideal: round 1 is the uniform mixture at D0's total (a probe; later updates start from
    # whichever of D0 and round 1 has the lower Q), or METHOD.md's step from D0 ("ideal"). The
    # probe is the default since 2026-12-03 (docs/results.md, "mixture quality"); a run started
    # before the option existed took METHOD.md's step ("before").
    first_round: str = field(default="uniform", metadata={"before": "ideal"})
    max_repeats: int = 4
    min_examples: int = 1
    keep_total: bool = True
    size_factor: bool = True
    objective: str = "mean"  # mean | pooled | worst
    proxy_steps: int | None = None  # doremi/doge: proxy run steps (None: the training's steps)
    proxy_eta: float = 1.0  # doremi/doge: step size of the domain-weight update
    proxy_smoothing: float = 1e-3  # doremi: smoothing toward uniform (the paper's c)

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise IdealError(
                f"update.geometry must be one of {', '.join(GEOMETRIES)}, got {self.geometry!r}"
            )
        if self.first_round not in FIRST_ROUNDS:
            raise IdealError(
                f"update.first_round must be one of {', '.join(FIRST_ROUNDS)}, "
                f"got {self.first_round!r}"
            )
        if self.geometry == "additive" and not self.size_factor:
            raise IdealError(
                "update.geometry additive takes the gradient in volumes, dQ/dn_i = alpha_i/n_i, "
                "which needs update.size_factor: true"
            )


@dataclass(frozen=True)
class InfluenceConfig:
    curvature: str = "ekfac"
    damping: float = 0.1
    damping_abs: float | None = None
    fisher: str = "sampled"
    fisher_samples: int = 1
    sample: float = SAMPLE  # fraction of each domain's copies for its score, capped below
    max_examples: int | None = MAX_EXAMPLES  # cap per domain (null: none)
    curvature_examples: int | None = CURVATURE_EXAMPLES  # curvature sample size (null: all)
    memory: str | None = None  # device budget, e.g. 70GiB: layers in groups that fit it
    layers: tuple[str, ...] | None = None
    batch_size: int = 16
    factors: str = "cpu"  # where the factors and sums live: cpu | device
    refine: int = 0  # conjugate-gradient steps toward the exact Gauss-Newton solution (0: off)
    # whose gradient scores a domain (ideal.influence.command.DOMAIN_ROWS): mixture | unseen
    domain_rows: str = "mixture"
    # the training objective the step differentiates (METHOD.md "Setting"): example | token, or
    # auto: what train.backend minimises (RunConfig.influence_loss)
    loss: str = "auto"

    def __post_init__(self) -> None:
        if self.loss not in ("auto", *LOSSES):
            raise IdealError(f"influence.loss must be auto, example or token, got {self.loss!r}")
        if self.domain_rows not in ("mixture", "unseen"):
            raise IdealError(
                f"influence.domain_rows must be mixture or unseen, got {self.domain_rows!r}"
            )

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


TRAIN_BACKENDS = ("builtin", "trl", "command", "llamafactory", "axolotl", "trl-cli")
EVAL_BACKENDS = ("builtin", "lm-eval", "command")
EVAL_PARSERS = ("scores", "lm-eval", "opencompass")
EXPORT_FORMATS = ("llamafactory", "trl", "axolotl")


@dataclass(frozen=True)
class TrainConfig(TrainSettings):
    """`train:` of the run config: the builtin loop's settings, and who trains (ideal.backends).

    The loop's fields (epochs, lr, batch_size, ...) drive `builtin` and map onto SFTConfig for
    `trl`; an external trainer (`command` and its presets) takes its recipe from its own config.
    """

    backend: str = "builtin"  # builtin | trl | command | llamafactory | axolotl | trl-cli
    command: str | tuple[str, ...] | None = None  # command template; presets have a default
    base_config: str | None = None  # presets: the tool's YAML that each round's config starts from
    export: str = "trl"  # command: the tool file `ideal export` writes beside the jsonl files
    env: dict[str, str] = field(default_factory=dict)  # more environment for the command
    timeout: float | None = 172800.0  # seconds before the command's process group is ended
    trl_args: dict[str, Any] = field(default_factory=dict)  # trl: more SFTConfig fields

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in TRAIN_BACKENDS:
            raise IdealError(
                f"train.backend must be one of {', '.join(TRAIN_BACKENDS)}, got {self.backend!r}"
            )
        if self.export not in EXPORT_FORMATS:
            raise IdealError(
                f"train.export must be one of {', '.join(EXPORT_FORMATS)}, got {self.export!r}"
            )
        if self.backend == "command" and not self.command:
            raise IdealError("train.backend command: give train.command, the command to run")
        if self.backend in ("llamafactory", "axolotl", "trl-cli") and not self.base_config:
            raise IdealError(
                f"train.backend {self.backend}: give train.base_config, your {self.backend} YAML"
            )
        if self.timeout is not None and not self.timeout > 0:
            raise IdealError(f"train.timeout must be > 0 seconds, got {self.timeout}")

    def settings(self) -> TrainSettings:
        """The builtin loop's settings alone (what `ideal train` takes and hashes)."""
        return TrainSettings(**{f.name: getattr(self, f.name) for f in fields(TrainSettings)})


@dataclass(frozen=True)
class EvalConfig:
    """`eval:` of the run config. Reference losses are always computed by ideal (the method needs
    them); `backend` says who scores the test capabilities (ideal.backends)."""

    scorers: dict[str, str] = field(default_factory=dict)  # capability -> scorer (default exact)
    max_new_tokens: int = 32
    batch_size: int = 32
    # decode the reference sets for `reference_accuracy`: auto = only when `select` needs it
    # (decoding is most of a real model's evaluation); always; never
    reference_accuracy: str = "auto"
    backend: str = "builtin"  # builtin | lm-eval | command
    command: str | tuple[str, ...] | None = None  # command: the evaluator's command template
    parse: str = "scores"  # command: {scores}, or the tool's results: lm-eval | opencompass
    tasks: dict[str, Any] = field(default_factory=dict)  # capability -> task/dataset and metric
    include_path: str | None = None  # lm-eval: directory of local task YAMLs
    include_defaults: bool = True  # lm-eval: also its shipped tasks (false: include_path only)
    limit: float | None = None  # lm-eval: examples per task
    options: dict[str, Any] = field(default_factory=dict)  # lm-eval: more simple_evaluate arguments
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = 172800.0

    def __post_init__(self) -> None:
        if self.backend not in EVAL_BACKENDS:
            raise IdealError(
                f"eval.backend must be one of {', '.join(EVAL_BACKENDS)}, got {self.backend!r}"
            )
        if self.parse not in EVAL_PARSERS:
            raise IdealError(
                f"eval.parse must be one of {', '.join(EVAL_PARSERS)}, got {self.parse!r}"
            )
        if self.backend == "command" and not self.command:
            raise IdealError("eval.backend command: give eval.command, the command to run")
        needs_tasks = self.backend == "lm-eval" or self.parse != "scores"
        if needs_tasks and not self.tasks:
            raise IdealError("eval.tasks: map each capability to the evaluator's task and metric")


@dataclass(frozen=True)
class RunConfig:
    suite: SuiteConfig | None = None
    model: str | None = None  # base model directory (ignored with a suite)
    train_data: str | None = None
    reference_data: str | None = None
    test_data: str | None = None
    rounds: int = 2  # IDEAL updates after round 0 (D0)
    tolerance: float = 0.01  # stop early when max |beta| after constraints falls below this
    # the round returned (ideal.methods.select): the lowest mean reference loss, measured over 4
    # suites x 5 seeds against the last round (docs/results.md, "mixture quality")
    select: str = "reference_loss"
    seed: int = 0
    max_length: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    update: UpdateSettings = field(default_factory=UpdateSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        needed = (self.model, self.train_data, self.reference_data)
        if self.eval.backend == "builtin":  # an external evaluator brings its own test sets
            needed = (*needed, self.test_data)
        if self.suite is None and not all(needed):
            raise IdealError(
                "config: give either 'suite' or all of 'model', 'train_data', 'reference_data', 'test_data'"
                + ("" if self.eval.backend == "builtin" else " (test_data optional)")
            )
        if self.rounds < 0:
            raise IdealError(f"config: rounds must be >= 0, got {self.rounds}")
        if self.select not in SELECTIONS:
            raise IdealError(
                f"config: select must be one of {', '.join(SELECTIONS)}, got '{self.select}'"
            )
        if self.eval.reference_accuracy not in REFERENCE_ACCURACY:
            raise IdealError(
                "config: eval.reference_accuracy must be one of "
                f"{', '.join(REFERENCE_ACCURACY)}, got '{self.eval.reference_accuracy}'"
            )
        if self.select == "reference_accuracy" and self.eval.reference_accuracy == "never":
            raise IdealError(
                "config: select reference_accuracy needs eval.reference_accuracy auto or always"
            )

    def decode_references(self) -> bool:
        """Whether each round decodes its reference sets (`eval.reference_accuracy`)."""
        if self.eval.reference_accuracy == "auto":
            return self.select == "reference_accuracy"
        return self.eval.reference_accuracy == "always"

    def influence_loss(self) -> tuple[str, str]:
        """`influence.loss` resolved: (example | token, where the value came from). `auto`
        follows the trainer: the builtin loop's `train.loss_normalization`; every other backend
        (TRL, LLaMA-Factory, axolotl, a command) normalises per token."""
        if self.influence.loss != "auto":
            return self.influence.loss, "influence.loss"
        if self.train.backend == "builtin":
            return (
                self.train.loss_normalization,
                "influence.loss auto: train.loss_normalization of train.backend builtin",
            )
        return (
            "token",
            f"influence.loss auto: train.backend {self.train.backend} normalises per token",
        )

    def influence_settings(self) -> InfluenceSettings:
        """The influence step's settings, with `influence.loss` resolved (`influence_loss`)."""
        return self.influence.settings(self.seed, self.influence_loss()[0])

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def hash(self) -> str:
        return sha256_text(json.dumps(self.to_dict(), sort_keys=True))


def config_changes(stored: dict[str, Any], current: dict[str, Any], cls: type = None) -> list[str]:
    """Dotted keys whose value differs between a stored config (a run's config.yaml) and the
    current one. A key the stored config lacks is no change when its current value is what the
    run did before the option existed: the field's default, or its `before` metadata where the
    default changed the behaviour (an option added to ideal since the run started)."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    defaults = {}
    for f in fields(cls):
        if "before" in f.metadata:
            defaults[f.name] = f.metadata["before"]
        elif f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    changes: list[str] = []
    for key in sorted((set(stored) | set(current)) - {"hash"}):
        if key not in stored:
            default = defaults.get(key, dataclasses.MISSING)
            if default is dataclasses.MISSING or current[key] != _plain(default):
                changes.append(key)
            continue
        if key not in current:
            changes.append(key)
            continue
        old, new = stored[key], current[key]
        nested = [t for t in _members(hints.get(key)) if dataclasses.is_dataclass(t)]
        if nested and isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{key}.{c}" for c in config_changes(old, new, nested[0])]
        elif old != new:
            changes.append(key)
    return changes


def _members(hint: Any) -> tuple:
    """The types of a hint, a union's members included."""
    if hint is None:
        return ()
    args = typing.get_args(hint)
    return args if args and isinstance(hint, types.UnionType) else (hint,)


def _plain(value: Any) -> Any:
    """A default as config.yaml stores it (dataclasses as mappings, tuples as lists)."""
    if dataclasses.is_dataclass(value):
        value = asdict(value)
    return json.loads(json.dumps(value))


def _build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass `cls` from plain data, recursively, with errors that name the key."""
    if not isinstance(data, dict):
        raise IdealError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise IdealError(
            f"{where or 'config'}: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})"
        )
    values = {}
    for name, value in data.items():
        values[name] = _convert(hints[name], value, f"{where}.{name}" if where else name)
    try:
        return cls(**values)
    except TypeError as err:
        raise IdealError(f"{where or 'config'}: {err}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        for option in options[:-1]:  # the first that takes the value (str | tuple: a string stays)
            try:
                return _convert(option, value, where)
            except IdealError:
                continue
        return _convert(options[-1], value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, list | tuple):
            value = [value] if not isinstance(value, str) else [v.strip() for v in value.split(",")]
        return tuple(_convert(item, v, where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise IdealError(f"{where}: expected a mapping")
        return dict(value)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool, float) and not isinstance(value, hint):
        raise IdealError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise IdealError(f"override {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, base: dict | None = None
) -> RunConfig:
    """YAML file (or `base` dict) + `key=value` overrides -> a validated RunConfig."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise IdealError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise IdealError(
                f"{path}{line}: invalid YAML ({getattr(err, 'problem', err)})"
            ) from None
        if not isinstance(loaded, dict):
            raise IdealError(f"{path}: expected a mapping at the top level")
        data.update(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise IdealError(f"override '{item}': expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)  # numbers, booleans, lists as YAML
        except yaml.YAMLError:
            value = raw  # e.g. a glob such as *.mlp.*
        _set(data, key.strip(), value)
    return _build(RunConfig, data, "")
