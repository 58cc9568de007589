"""The trainer and the evaluator that `train.backend` and `eval.backend` name (protocol.py)."""

from __future__ import annotations

from typing import Any

from ideal.backends.settings import EvalConfig, TrainConfig


def make_trainer(train: TrainConfig) -> Any:
    """The trainer `train.backend` names."""
    if train.backend == "builtin":
        from ideal.backends.training.builtin import BuiltinTrainer

        return BuiltinTrainer(train.settings())
    if train.backend == "trl":
        from ideal.backends.tools.trl_sft import TrlTrainer

        return TrlTrainer(train.settings(), dict(train.trl_args))
    if train.backend == "command":
        from ideal.backends.tools.external import CommandTrainer

        return CommandTrainer(train.command, train.export, dict(train.env), train.timeout)
    from ideal.backends.tools.presets import preset_trainer

    return preset_trainer(
        train.backend,
        train.base_config,
        train.command,
        dict(train.env),
        train.timeout,
        train.max_length,
        train.parity,
    )


def make_evaluator(spec: EvalConfig) -> Any:
    """The external evaluator `eval.backend` names, or None for the builtin one."""
    if spec.backend == "lm-eval":
        from ideal.backends.evaluation.lmeval import LmEvalEvaluator

        return LmEvalEvaluator(
            dict(spec.tasks),
            spec.include_path,
            spec.limit,
            spec.batch_size,
            dict(spec.options),
            spec.include_defaults,
        )
    if spec.backend == "command":
        from ideal.backends.tools.external import CommandEvaluator

        return CommandEvaluator(
            spec.command, spec.parse, dict(spec.tasks), dict(spec.env), spec.timeout
        )
    return None
