"""Loading local Hugging Face model directories (never a hub id): tokenizer and causal LM.

Everything goes through `AutoTokenizer` / `AutoModelForCausalLM` with `local_files_only=True`, so any
local causal LM directory works and nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from ideal.errors import IdealError

hf_logging.disable_progress_bar()  # our own progress bars say what is happening


ADAPTER_CONFIG = "adapter_config.json"


def _model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise IdealError(f"{path}: model directory not found")
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        raise IdealError(f"{path}: not a Hugging Face model directory (no config.json)")
    return path


def _adapter_base(path: Path) -> Path | None:
    """The base model directory of a peft adapter directory, or None for a plain model."""
    if not (path / ADAPTER_CONFIG).is_file():
        return None
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as err:
        raise IdealError(
            f"{path / ADAPTER_CONFIG}:{err.lineno}: invalid JSON ({err.msg})"
        ) from None
    if not base or not Path(base).is_dir():
        raise IdealError(f"{path / ADAPTER_CONFIG}: base model '{base}' is not a local directory")
    return Path(base)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a model directory (of its base model, for an adapter without one)."""
    path = _model_dir(path)
    base = _adapter_base(path)
    source = base if base is not None and not (path / "tokenizer_config.json").is_file() else path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise IdealError(f"{source}: cannot load the tokenizer ({_first_line(err)})") from None
    if tokenizer.eos_token_id is None:  # every answer ends with EOS, trained on and generated
        raise IdealError(
            f"{source}: the tokenizer has no EOS token; set eos_token in its tokenizer_config.json"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = (
            tokenizer.eos_token
        )  # padding positions never carry loss or statistics
    return tokenizer


def load_causal_lm(path: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A local causal LM, or a peft adapter over one; another kind of model is a clear error."""
    path = _model_dir(path)
    base = _adapter_base(path)
    config_dir = base if base is not None else path
    try:
        model_type = json.loads((config_dir / "config.json").read_text()).get("model_type")
    except FileNotFoundError:
        raise IdealError(
            f"{config_dir}: not a Hugging Face model directory (no config.json)"
        ) from None
    except json.JSONDecodeError as err:
        raise IdealError(
            f"{config_dir / 'config.json'}:{err.lineno}: invalid JSON ({err.msg})"
        ) from None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise IdealError(f"{config_dir}: model type '{model_type}' is not a causal language model")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            config_dir, dtype=dtype or "auto", local_files_only=True
        )
        if base is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, path, is_trainable=False)
        return model
    except (OSError, ValueError) as err:
        raise IdealError(f"{path}: cannot load the model ({_first_line(err)})") from None
