"""ideal: data mixtures for multi-capability SFT with the IDEAL method.

The Python API mirrors the command line (`ideal --help`); the CLI is a thin layer over it.
"""

from ideal.data import Example, Tokenized, load_domains, tokenize_examples
from ideal.errors import IdealError
from ideal.mixture import Constraints, Mixture, apply_constraints, resample
from ideal.reweight import reweight
from ideal.rules import ideal_beta, sensitivities

__version__ = "0.1.0"

__all__ = [
    "Constraints",
    "Example",
    "IdealError",
    "Mixture",
    "Tokenized",
    "apply_constraints",
    "ideal_beta",
    "load_domains",
    "resample",
    "reweight",
    "sensitivities",
    "tokenize_examples",
]
