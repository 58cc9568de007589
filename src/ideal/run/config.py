"""Run configuration: dataclasses loaded from YAML, `key=value` overrides, validation, a stable hash.

    ideal run CONFIG.yaml [key=value ...]     e.g.  rounds=3 update.step=0.3 train.lr=1e-3

A config names either the embedded suite (`suite:`, generated into the run directory) or the user's
own `model`, `train`, `reference` and `test` directories. Unknown keys are errors naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from ideal.artifacts import sha256_text
from ideal.backends.settings import EvalConfig, TrainConfig
from ideal.data.suite import SuiteConfig
from ideal.errors import IdealError
from ideal.influence.settings import InfluenceConfig, InfluenceJob
from ideal.methods.select import SELECTIONS
from ideal.methods.settings import UpdateSettings
from ideal.run.search import SearchSettings
from ideal.settings import check_choices, default_of, help_of, hint_members, setting

# Keys that two levels would both accept: the top level is their home (they also drive the
# influence step and the evaluation); RunConfig copies them into `train`.
MIRRORED = {"train.max_length": "max_length", "train.seed": "seed"}


@dataclass(frozen=True)
class RunConfig:
    """The whole run: where the data and model are, how many rounds, and one section per part."""

    suite: SuiteConfig | None = setting(
        None, "The embedded suite (generated into the run directory) instead of your own data."
    )
    model: str | None = setting(
        None,
        "Base model: a local Hugging Face directory, or a hub id (Org/Name) already in the local "
        "Hugging Face cache (nothing is downloaded).",
    )
    train_data: str | None = setting(None, "Training domains: <dir>/<domain>/<data files>.")
    reference_data: str | None = setting(
        None, "Reference sets, one per capability: they drive the method."
    )
    test_data: str | None = setting(
        None, "Test sets, one per capability: they only measure (optional with eval.backend)."
    )
    rounds: int = setting(
        2,
        "Rounds after round 0 (D0). Under update.first_round uniform (the default) round 1 is "
        "the uniform probe, so rounds 2 gives one IDEAL step, rounds 3 two.",
    )
    tolerance: float = setting(
        0.01, "Stop early when the largest relative volume change falls below this."
    )
    # measured over 4 suites x 5 seeds against the last round (docs/results.md)
    select: str = setting(
        "reference_loss",
        "The round returned: the lowest mean reference loss, the best reference accuracy, or "
        "the last.",
        choices=SELECTIONS,
    )
    seed: int = setting(0, "Seed of D0's draw, resampling, training and the influence sample.")
    max_length: int | None = setting(None, "Truncate every example to this many tokens.")
    train: TrainConfig = setting(factory=TrainConfig, help="Who trains, and the recipe.")
    influence: InfluenceConfig = setting(factory=InfluenceConfig, help="The influence step.")
    update: UpdateSettings = setting(factory=UpdateSettings, help="The update rule.")
    eval: EvalConfig = setting(factory=EvalConfig, help="The evaluation.")
    search: SearchSettings | None = setting(
        None,
        "Search the mixture cheap, train it once: the rounds train with this recipe (a smaller "
        "model, a fraction of the data, other train/eval keys), then the returned mixture is "
        "trained once with the recipe above (RUN/final/). Absent: every round uses the recipe.",
    )

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
        check_choices(self, "")
        if self.select == "reference_accuracy" and self.eval.reference_accuracy == "never":
            raise IdealError(
                "config: select reference_accuracy needs eval.reference_accuracy auto or always"
            )
        if (self.train.max_length, self.train.seed) != (self.max_length, self.seed):
            mirrored = replace(self.train, max_length=self.max_length, seed=self.seed)
            object.__setattr__(self, "train", mirrored)
        self.search_config()  # the search recipe is whole: its errors name search.<key>

    def search_config(self) -> RunConfig:
        """The config the rounds run with: with `search:`, its model and its overrides of
        `train:` and `eval:` (errors name `search.train.<key>`); without it, this config.

        A recipe counted in steps (`train.max_steps`) keeps its passes over the data: under
        `search.fraction` its steps scale by the fraction too, unless `search.train` sets them
        (`epochs` scale by themselves)."""
        if self.search is None:
            return self
        overrides = dict(self.search.train)
        steps = self.train.max_steps
        if steps is not None and "max_steps" not in overrides and self.search.fraction < 1:
            overrides["max_steps"] = max(1, math.ceil(self.search.fraction * steps))
        train = _overridden(self.train, overrides, "search.train")
        eval_ = _overridden(self.eval, self.search.eval, "search.eval")
        try:
            return replace(
                self, model=self.search.model or self.model, train=train, eval=eval_, search=None
            )
        except IdealError as err:
            raise IdealError(f"search: {str(err).removeprefix('config: ')}") from None

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

    def influence_job(self) -> InfluenceJob:
        """The influence step's one settings object, `influence.loss` resolved."""
        loss, source = self.influence_loss()
        return InfluenceJob(
            config=self.influence,
            seed=self.seed,
            loss=loss,
            loss_source=source,
            max_length=self.max_length,
            objective=self.update.objective,
            size_factor=self.update.size_factor,
            top_layers=self.train.top_layers,
            feature_cache=self.train.feature_cache,
        )

    def to_dict(self) -> dict[str, Any]:
        tree = json.loads(json.dumps(asdict(self)))
        if tree["search"] is None:  # without it, the hash of a run started before it existed
            del tree["search"]
        return tree

    def hash(self) -> str:
        return sha256_text(json.dumps(self.to_dict(), sort_keys=True))


# update settings that only an IDEAL step reads: a run that takes none (another rule, or no round
# past D0) is the same run whatever their value
IDEAL_STEP_ONLY = ("update.rescore",)


def takes_ideal_step(tree: dict[str, Any]) -> bool:
    """Whether a config's dictionary runs an IDEAL update: rule ideal and a round past D0 (the
    uniform probe comes first only with two rounds or more, ideal.run.loop)."""
    return (tree.get("update") or {}).get("rule") == "ideal" and tree.get("rounds", 0) >= 1


def read_changes(changes: list[str], current: dict[str, Any]) -> list[str]:
    """The changes (config_changes) that a run with config `current` reads: none of an IDEAL
    step's settings where no IDEAL step runs."""
    return (
        changes if takes_ideal_step(current) else [c for c in changes if c not in IDEAL_STEP_ONLY]
    )


def config_changes(stored: dict[str, Any], current: dict[str, Any], cls: type = None) -> list[str]:
    """Dotted keys whose value differs between a stored config (a run's config.yaml) and the
    current one. A key the stored config lacks is no change when its current value is what the
    run did before the option existed: the field's default, or its `before` metadata where the
    default changed the behaviour (an option added to ideal since the run started)."""
    if cls is None:  # the top: mirrored keys follow their home, compared there
        stored = _without_mirrors(stored)
        current = _without_mirrors(current)
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
        nested = [t for t in hint_members(hints.get(key)) if dataclasses.is_dataclass(t)]
        if nested and isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{key}.{c}" for c in config_changes(old, new, nested[0])]
        elif old != new:
            changes.append(key)
    return changes


def _without_mirrors(tree: dict[str, Any]) -> dict[str, Any]:
    out = dict(tree)
    for dotted in MIRRORED:
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


def _refuse_mirrors(data: dict[str, Any]) -> None:
    """`train.max_length` / `train.seed` in a config: one line naming the key's home."""
    for dotted, home in MIRRORED.items():
        section, key = dotted.split(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            raise IdealError(
                f"{dotted}: set '{home}' at the top of the config instead (one home: it also "
                "drives the influence step and the evaluation)"
            )


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
    values, words = {}, {f.name: f.metadata.get("none") for f in fields(cls)}
    for name, value in data.items():
        if words[name] is not None and value == words[name]:  # `max_examples: all`, as the flag
            value = None
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
    if dataclasses.is_dataclass(hint):  # an empty section (`train:` alone) is its defaults
        return _build(hint, {} if value is None else value, where)
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


def _overridden(section: Any, overrides: dict[str, Any], where: str) -> Any:
    """A settings section with `overrides` applied, built as the config loader builds it: an
    unknown key, a wrong type or a bad value is an error naming `where.<key>`."""
    name = where.rsplit(".", 1)[-1]
    for key in overrides:
        if f"{name}.{key}" in MIRRORED:
            raise IdealError(
                f"{where}.{key}: the search runs with the config's '{MIRRORED[name + '.' + key]}'"
                " (one home: it also drives the influence step and the evaluation)"
            )
    try:
        return _build(type(section), {**_plain(section), **overrides}, where)
    except IdealError as err:
        message = str(err)
        if message.startswith(f"{name}."):  # a section's own check: `train.lr must be > 0`
            message = f"search.{message}"
        elif not message.startswith(where):
            message = f"{where}: {message}"
        raise IdealError(message) from None


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
    _refuse_mirrors(data)
    if "search" in data and data["search"] is None:  # an empty `search:` is its defaults
        data["search"] = {}
    return _build(RunConfig, data, "")


def config_template(model: str, train: str, reference: str, test: str) -> str:
    """A commented run config for your own data (`ideal init`): the data and model filled in,
    then every section's settings at their defaults with their help, commented out."""
    lines = [
        "# ideal run config: `ideal run run.yaml --out runs/mine`; keys below at their defaults",
        "# (uncomment to change). Check it first: `ideal check --config run.yaml`.",
        f"model: {model}  # {help_of(RunConfig, 'model')}",
        f"train_data: {train}",
        f"reference_data: {reference}",
    ]
    lines.append(f"test_data: {test}")
    for name in ("rounds", "tolerance", "select", "seed", "max_length"):
        lines += _commented(name, default_of(RunConfig, name), help_of(RunConfig, name), "")
    for section in ("train", "influence", "update", "eval"):
        cls = typing.get_type_hints(RunConfig)[section]
        lines.append(f"{section}:  # {help_of(RunConfig, section)}")
        for f in fields(cls):
            if f"{section}.{f.name}" in MIRRORED:
                continue
            lines += _commented(f.name, default_of(cls, f.name), help_of(cls, f.name), "  ")
    lines += [f"# {part}" for part in textwrap.wrap(help_of(RunConfig, "search"), 98)]
    lines.append("# search:")
    for f in fields(SearchSettings):
        lines += _commented(
            f.name, default_of(SearchSettings, f.name), help_of(SearchSettings, f.name), "  "
        )
    return "\n".join(lines) + "\n"


def _commented(key: str, value: Any, help: str, indent: str) -> list[str]:
    """`# key: default  # help`, the help on lines of its own above when the line runs long."""
    shown = yaml.safe_dump(_plain(value), default_flow_style=True).strip().removesuffix("...")
    line = f"{indent}# {key}: {shown.strip()}"
    if len(line) + len(help) + 4 <= 100:
        return [f"{line}  # {help}"]
    wrapped = textwrap.wrap(help, 100 - len(indent) - 4)
    return [*(f"{indent}# {part}" for part in wrapped), line]
