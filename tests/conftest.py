"""Shared fixtures. One torch thread by default (two threads on a busy 2-core machine run 7-20x
slower); `make test THREADS=2` sets IDEAL_TEST_THREADS, and every tolerance must hold either way."""

from __future__ import annotations

import os

THREADS = int(os.environ.get("IDEAL_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from ideal.tiny import char_tokenizer  # noqa: E402
from tests.helpers import CliResult, run_cli  # noqa: E402

torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def cli(capsys):
    def run(*args: str) -> CliResult:
        return run_cli(capsys, *args)

    return run
