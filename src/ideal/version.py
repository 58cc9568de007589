"""The version of ideal: one home, read by pyproject.toml, `ideal --version` and `ideal.__version__`."""

__version__ = "0.1.0"
