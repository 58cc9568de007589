"""Fail fast: every mistake of a run config found before anything trains.

`ideal run`, `ideal compare` and `ideal check --config` call `preflight(config)`: it reads every data
directory (rows included), checks each scorer name and the capability it names, the backends'
options, the base model with its tokenizer, and a search recipe's model (`search.model`: the same
vocabulary and chat template as the base model's) and keys. The first mistake is an IdealError of
one line that names the key and the value; what is suspicious but legal comes back as warnings.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ideal.errors import IdealError
from ideal.run.config import RunConfig

if TYPE_CHECKING:
    from ideal.backends.tools.parity import Parity

log = logging.getLogger("ideal")

# what `train.backend` / `eval.backend` import in this process, and the extra that brings it
_IMPORTS = {("train", "trl"): ("trl", "trl"), ("eval", "lm-eval"): ("lm_eval", "lm-eval")}


@dataclass
class Preflight:
    """What the checks found: the capabilities of each set, and the warnings to show."""

    domains: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    tests: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def preflight(config: RunConfig, config_file: str | Path | None = None) -> Preflight:
    """Check the whole run (module docstring); returns what was found, raises on a mistake."""
    found = Preflight()
    if config.suite is not None:
        found.domains = sorted(d.name for d in config.suite.domains)
        found.references = found.tests = sorted(config.suite.capabilities)
    else:
        _check_data(config, found)
        _check_model(config)
    _check_top_layers(config, "train")
    _check_influence_layers(config)
    _check_scorers(config, found)
    _check_backends(config, found, config_file)
    if config.search is not None:
        _check_search(config)
    if config.rounds == 0:
        found.warnings.append("rounds 0: only D0 is trained and evaluated; no IDEAL step follows")
    influence = config.influence
    if influence.sample >= 1.0 and influence.max_examples is None and config.update.min_z > 0:
        found.warnings.append(
            "influence.sample 1.0 with max_examples all scores every copy: the standard errors"
            " are 0, so update.min_z's noise gate passes every domain"
        )
    if config.update.rescore and (influence.max_examples is None or config.update.min_z <= 0):
        found.warnings.append(
            "update.rescore does nothing here: "
            + (
                "influence.max_examples is all already"
                if influence.max_examples is None
                else "update.min_z 0 holds no sensitivity back"
            )  # fmt: skip
        )
    return found


def _check_data(config: RunConfig, found: Preflight) -> None:
    from ideal.data.mixture_io import load_training_set
    from ideal.data.rows import load_domains

    for key in ("train_data", "reference_data", "test_data"):
        value = getattr(config, key)
        if value is not None and not Path(value).is_dir():
            raise IdealError(f"{key}: {value}: not a directory")
    found.domains = sorted(_loaded("train_data", lambda: load_training_set(config.train_data).pool))
    found.references = sorted(
        _loaded("reference_data", lambda: load_domains(config.reference_data))
    )
    if config.test_data is not None:
        found.tests = sorted(_loaded("test_data", lambda: load_domains(config.test_data)))
        for name in sorted(set(found.references) - set(found.tests)):
            found.warnings.append(
                f"capability '{name}' has a reference set but no test set in test_data "
                f"({config.test_data}): it drives the method but is never measured"
            )
        for name in sorted(set(found.tests) - set(found.references)):
            found.warnings.append(
                f"capability '{name}' has a test set but no reference set in reference_data "
                f"({config.reference_data}): it is measured but the method cannot aim at it"
            )


def _loaded(key: str, load):
    """Run a loader; its error keeps its own line (file, line, reason) after the key."""
    try:
        return load()
    except IdealError as err:
        raise IdealError(f"{key}: {err}") from None


def _check_model(config: RunConfig) -> None:
    from ideal.hf import load_tokenizer

    try:
        load_tokenizer(config.model)
    except IdealError as err:
        raise IdealError(f"model: {err}") from None


def _check_top_layers(config: RunConfig, key: str) -> None:
    """`train.top_layers` against the model's blocks (its config.json alone) or the suite's;
    `key` names the section in the error (train, or search.train)."""
    top = config.train.top_layers
    if not top:
        return
    if config.model is None:  # the embedded suite's model
        assert config.suite is not None
        if top > config.suite.num_layers:
            raise IdealError(
                f"{key}.top_layers is {top}, but the suite's model has "
                f"{config.suite.num_layers} blocks"
            )
        return
    from ideal.backends.training.top_layers import check_top_layers
    from ideal.hf import resolve_model_dir
    from ideal.influence.plan import meta_model

    try:
        check_top_layers(meta_model(resolve_model_dir(config.model)), top)
    except IdealError as err:
        raise IdealError(f"{key}.{str(err).removeprefix('train.')}") from None


def _check_influence_layers(config: RunConfig) -> None:
    """`influence.layers` as the rounds' influence step will select them, on the model's shapes
    alone (the meta device; a LoRA recipe's adapter added as the builtin trainer adds it): a
    pattern that matches no linear layer, or a layer below the top K blocks that train (with
    cached features those blocks never run), is an error naming the key. The rounds run with the
    search recipe when there is one; external trainers wrap their own adapters (not checked)."""
    rounds = config.search_config()
    if not config.influence.layers or rounds.train.backend != "builtin":
        return
    from ideal.influence.capture import select_layers

    model = _meta_model(rounds)
    if rounds.train.lora:
        from ideal.backends.training.builtin import wrap_lora

        model = wrap_lora(model, rounds.train.settings())
    try:
        selected = select_layers(model, config.influence.layers)
    except IdealError as err:
        raise IdealError(f"influence.layers: {str(err).removeprefix('--layers ')}") from None
    top = rounds.train.top_layers
    if top:
        from ideal.backends.training.top_layers import check_inside_top

        searched = config.search is not None and "top_layers" in config.search.train
        where = "search.train.top_layers" if searched else "train.top_layers"
        check_inside_top(model, top, selected, "influence.layers", where)


def _meta_model(config: RunConfig) -> Any:
    """The config's model on the meta device (shapes and names, no weights): the base model's
    config.json, or the embedded suite's model."""
    import torch

    from ideal.influence.plan import meta_model

    if config.model is not None:
        from ideal.hf import resolve_model_dir

        return meta_model(resolve_model_dir(config.model))
    from ideal.tiny import char_tokenizer, tiny_causal_lm

    suite = config.suite
    assert suite is not None
    with torch.device("meta"):
        return tiny_causal_lm(
            "llama", vocab_size=len(char_tokenizer()), hidden_size=suite.hidden_size,
            num_layers=suite.num_layers, num_heads=suite.num_heads,
            intermediate_size=suite.intermediate_size,
        )  # fmt: skip


def _check_search(config: RunConfig) -> None:
    """The search recipe: its model shares the base model's tokenizer (the influence step's
    scores and the mixture's rows mean the same tokens at both scales), its trainer and
    evaluator are installed, its top_layers fits its model."""
    assert config.search is not None
    search = config.search_config()
    if config.search.model:
        from ideal.hf import load_tokenizer
        from ideal.tiny import char_tokenizer

        try:
            theirs = load_tokenizer(config.search.model)
        except IdealError as err:
            raise IdealError(f"search.model: {err}") from None
        # the embedded suite's model is built with the character tokenizer
        ours = char_tokenizer() if config.model is None else load_tokenizer(config.model)
        difference = tokenizer_difference(ours, theirs)
        if difference is not None:
            raise IdealError(
                f"search.model: {config.search.model}: its tokenizer differs from the base "
                f"model's ({difference}); a search model must share the tokenizer"
            )
    _check_imports(search, "search.")
    _check_top_layers(search, "search.train")


def tokenizer_difference(ours: Any, theirs: Any) -> str | None:
    """How `theirs` differs from `ours` in what the loop relies on (the vocabulary and the chat
    template), in a few words, or None when they agree."""
    a, b = ours.get_vocab(), theirs.get_vocab()
    if len(a) != len(b):
        return f"vocabulary of {len(b)} tokens, not {len(a)}"
    moved = sum(1 for token, i in a.items() if b.get(token) != i)
    if moved:
        return f"{moved} of {len(a)} tokens have other ids"
    if getattr(ours, "chat_template", None) != getattr(theirs, "chat_template", None):
        return "another chat template"
    return None


def _check_scorers(config: RunConfig, found: Preflight) -> None:
    from ideal.backends.evaluation.evaluate import scorer_names

    known = scorer_names()
    capabilities = sorted({*found.tests, *found.references})  # a scorer also decodes references
    for capability, name in config.eval.scorers.items():
        if name not in known:
            raise IdealError(
                f"eval.scorers.{capability}: unknown scorer '{name}' (choose from "
                f"{', '.join(known)})"
            )
        if capability not in capabilities:
            raise IdealError(
                f"eval.scorers.{capability}: no capability '{capability}' in the test or "
                f"reference sets (they are: {', '.join(capabilities)})"
            )


def _check_imports(config: RunConfig, prefix: str = "") -> None:
    """The packages `train.backend` and `eval.backend` import in this process are installed."""
    for (part, backend), (module, extra) in _IMPORTS.items():
        if getattr(config, part).backend == backend and importlib.util.find_spec(module) is None:
            raise IdealError(
                f"{prefix}{part}.backend {backend}: {module} is not installed; "
                f"pip install 'ideal-mix[{extra}]'"
            )


def _check_backends(config: RunConfig, found: Preflight, config_file: str | Path | None) -> None:
    _check_imports(config)
    train = config.train
    base = None
    if train.base_config:
        from ideal.backends.tools.presets import load_base_config

        try:
            base = load_base_config(train.base_config, train.backend)
        except IdealError as err:
            raise IdealError(f"train.base_config: {err}") from None
    if config.eval.backend != "builtin" or config.eval.parse != "scores":
        capabilities = set(found.tests or found.references)
        for name in sorted(set(config.eval.tasks) - capabilities) if capabilities else []:
            found.warnings.append(
                f"eval.tasks.{name}: no reference or test set named '{name}' (they are: "
                f"{', '.join(sorted(capabilities))}): it is scored, but the method cannot aim at it"
            )
    from ideal.backends.tools.masking import masking_warnings
    from ideal.backends.tools.trainer_rows import check_trainer_rows

    where = str(train.base_config) if base is not None else str(config_file or "the run config")
    model = None if config.suite is not None else config.model
    found.warnings += masking_warnings(train.backend, base, where, model, dict(train.trl_args))
    # rows the tool would drop or deduplicate (errors), or cut otherwise than ideal (warnings)
    found.warnings += check_trainer_rows(config, base, where)


def config_parity(config: RunConfig, config_file: str | Path | None) -> tuple[Parity | None, str]:
    """`ideal check --config`: round 0's mixture (train_data, every row once) through the run's
    trainer, as its first round would export and render it. (parity, "") or (None, why not)."""
    from ideal.backends.factory import make_trainer
    from ideal.backends.protocol import TrainJob
    from ideal.backends.tools.external import ToolNotFound
    from ideal.backends.tools.parity import BACKENDS, TOOL_EXECUTABLES, compare_probe
    from ideal.backends.tools.parity_run import (
        parity_of,
        probe_python,
        tokenize_export,
        tool_importable,
        trl_document,
    )
    from ideal.backends.tools.presets import load_base_config
    from ideal.data.export import export_mixture
    from ideal.data.mixture_io import load_training_set, write_mixture_dir
    from ideal.hf import load_tokenizer, resolve_model_dir

    backend = config.train.backend
    if backend not in BACKENDS:
        return None, f"train.backend {backend} has no data pipeline of its own"
    if config.suite is not None or config.train_data is None or config.model is None:
        return None, "the embedded suite is generated when the run starts"
    base_model = resolve_model_dir(config.model)
    training = load_training_set(config.train_data)
    with tempfile.TemporaryDirectory(prefix="ideal-parity-") as scratch:
        round_dir = Path(scratch) / "round-0"
        write_mixture_dir(round_dir, training, training.mixture, data_subdir="data")
        if backend == "trl":
            export_mixture(round_dir / "mixture.json", "trl", round_dir / "export", absolute=True)
            tokenizer = load_tokenizer(base_model)
            domains = training.mixture.domains
            exported = tokenize_export(round_dir / "export", domains, tokenizer, config.max_length)
            parity = compare_probe(
                "trl", trl_document(exported, tokenizer), exported, {}, tokenizer
            )
            parity.python = sys.executable
            return parity, ""
        trainer = make_trainer(config.train)
        job = TrainJob(
            base_model, round_dir, round_dir / "model", 0, Path(scratch),
            Path(config_file or Path(scratch) / "config.yaml"),
        )  # fmt: skip
        try:
            prepared = trainer.prepare(job)
        except ToolNotFound as err:  # `ideal run` will stop there: said, the rest is checked
            return None, str(err)
        python, why = probe_python(prepared.argv, prepared.env, TOOL_EXECUTABLES[backend])
        if python is not None:
            why = tool_importable(backend, python) or ""
        if why:
            return None, why
        assert python is not None
        base = load_base_config(config.train.base_config, backend)
        parity = parity_of(
            backend, base, prepared.data_dir, prepared.config_file, base_model,
            config.max_length, python, prepared.env,
        )  # fmt: skip
        return parity, ""
