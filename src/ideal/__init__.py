"""ideal: data mixtures for multi-capability SFT with the IDEAL method.

The Python API mirrors the command line (`ideal --help`); the CLI is a thin layer over it:

    ideal run / demo      ideal.load_config, ideal.run_loop
    ideal influence       ideal.compute_influence, ideal.run_influence
    ideal reweight        ideal.methods.reweight.reweight, ideal.update_mixture
    ideal train / eval    ideal.run_train, ideal.run_eval, ideal.register_scorer (eval.scorers)
    ideal compare         ideal.run_compare
    ideal export          ideal.export_mixture
    ideal report          ideal.write_report

Names are imported on first use, so `import ideal` stays light (no torch until needed). The parts of
the package and what each may import: docs/reference.md ("Files") and each subpackage's __init__.py.
"""

from __future__ import annotations

import importlib
from typing import Any

from ideal.version import __version__  # noqa: F401  (ideal.__version__)

_EXPORTS = {
    "IdealError": "ideal.errors",
    "Example": "ideal.data.rows",
    "Tokenized": "ideal.data.rows",
    "load_domains": "ideal.data.rows",
    "tokenize_examples": "ideal.data.rows",
    "Constraints": "ideal.data.mixture",
    "Mixture": "ideal.data.mixture",
    "apply_constraints": "ideal.data.mixture",
    "resample": "ideal.data.mixture",
    "ideal_beta": "ideal.methods.rules",
    "sensitivities": "ideal.influence.objective",
    "update_mixture": "ideal.methods.reweight",
    "load_training_set": "ideal.data.mixture_io",
    "InfluenceConfig": "ideal.influence.settings",
    "InfluenceJob": "ideal.influence.settings",
    "InfluenceSettings": "ideal.influence.settings",
    "domain_influence": "ideal.influence.engine",
    "compute_influence": "ideal.influence.step",
    "run_influence": "ideal.influence.step",
    "TrainSettings": "ideal.backends.training.builtin",
    "run_train": "ideal.backends.training.builtin",
    "run_eval": "ideal.backends.evaluation.evaluate",
    "register_scorer": "ideal.backends.evaluation.evaluate",
    "load_config": "ideal.run.config",
    "run_loop": "ideal.run.loop",
    "run_compare": "ideal.run.compare",
    "export_mixture": "ideal.data.export",
    "write_report": "ideal.report.run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ideal' has no attribute {name!r}")
