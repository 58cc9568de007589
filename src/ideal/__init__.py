"""ideal: data mixtures for multi-capability SFT with the IDEAL method.

The Python API mirrors the command line (`ideal --help`); the CLI is a thin layer over it:

    ideal run / demo      ideal.load_config, ideal.run_loop
    ideal influence       ideal.compute_influence, ideal.run_influence
    ideal reweight        ideal.reweight.reweight, ideal.update_mixture
    ideal train / eval    ideal.run_train, ideal.run_eval
    ideal compare         ideal.run_compare
    ideal export          ideal.export_mixture
    ideal report          ideal.write_report

Names are imported on first use, so `import ideal` stays light (no torch until needed). (`reweight`
is not exported: `ideal.reweight` is the module of that name.)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "IdealError": "ideal.errors",
    "Example": "ideal.data",
    "Tokenized": "ideal.data",
    "load_domains": "ideal.data",
    "tokenize_examples": "ideal.data",
    "Constraints": "ideal.mixture",
    "Mixture": "ideal.mixture",
    "apply_constraints": "ideal.mixture",
    "resample": "ideal.mixture",
    "ideal_beta": "ideal.rules",
    "sensitivities": "ideal.rules",
    "update_mixture": "ideal.reweight",
    "load_training_set": "ideal.mixture_io",
    "InfluenceSettings": "ideal.influence",
    "domain_influence": "ideal.influence",
    "compute_influence": "ideal.influence_io",
    "run_influence": "ideal.influence_io",
    "TrainSettings": "ideal.train",
    "run_train": "ideal.train",
    "run_eval": "ideal.evaluate",
    "load_config": "ideal.config",
    "run_loop": "ideal.loop",
    "run_compare": "ideal.compare",
    "export_mixture": "ideal.export",
    "write_report": "ideal.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ideal' has no attribute {name!r}")
