"""Loading local Hugging Face model directories (never a hub id): tokenizer and causal LM.

Everything goes through `AutoTokenizer` / `AutoModelForCausalLM` with `local_files_only=True`, so any
local causal LM directory works and nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from ideal.errors import IdealError

hf_logging.disable_progress_bar()  # our own progress bars say what is happening


def _model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise IdealError(f"{path}: model directory not found")
    if not (path / "config.json").is_file():
        raise IdealError(f"{path}: not a Hugging Face model directory (no config.json)")
    return path


def load_tokenizer(path: str | Path) -> Any:
    path = _model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise IdealError(f"{path}: cannot load the tokenizer ({first})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = (
            tokenizer.eos_token
        )  # padding positions never carry loss or statistics
    return tokenizer


def load_causal_lm(path: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A local causal LM; a directory holding another kind of model is a clear error."""
    path = _model_dir(path)
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise IdealError(f"{path / 'config.json'}:{err.lineno}: invalid JSON ({err.msg})") from None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise IdealError(f"{path}: model type '{model_type}' is not a causal language model")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        return AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype or "auto", local_files_only=True
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise IdealError(f"{path}: cannot load the model ({first})") from None
