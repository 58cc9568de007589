"""`python -m ideal ...` is the `ideal` command."""

from ideal.cli import entry

entry()
