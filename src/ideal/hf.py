"""Loading Hugging Face models from this machine: tokenizer and causal LM, never a download.

A model is a local directory, or a hub id (`Org/Name`) already in the local Hugging Face cache
(`hf download Org/Name` put it there): `resolve_model_dir` turns either into a directory, and every
loader here goes through it. Everything goes through `AutoTokenizer` / `AutoModelForCausalLM` with
`local_files_only=True`, so any local causal LM directory works and nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from ideal.errors import IdealError

hf_logging.disable_progress_bar()  # our own progress bars say what is happening


ADAPTER_CONFIG = "adapter_config.json"
#: the dtype every pass of a round loads its model in (training, evaluation, influence): the
#: builtin trainer keeps float32 weights (bf16 only as autocast, on a GPU that has it), and the
#: passes after it load the round's model the same way, so that they score the weights that were
#: trained and share one feature cache (ideal.backends.training.top_layers keys it by dtype).
#: A bf16 checkpoint is upcast exactly.
ROUND_DTYPE = torch.float32
#: "Org/Name" as the hub spells repository ids (huggingface_hub's validate_repo_id, namespaced).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def looks_like_hub_id(name: str) -> bool:
    return (
        len(name) <= 96
        and HUB_ID.fullmatch(name) is not None
        and ".." not in name
        and "--" not in name
        and not name.endswith(".git")
    )


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache as the environment names it at this call: HF_HUB_CACHE,
    else HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default (which it reads
    once, at import)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_model_dir(name: str | Path) -> Path:
    """The directory of a model given as a local directory, or as a hub id (`Org/Name`) found in
    the local Hugging Face cache (its snapshot of the `main` ref). Nothing touches the network.

    Raises IdealError (one line) when it is neither, saying how to download it.
    """
    path = Path(name)
    if path.is_dir():
        return path
    text = str(name)
    if path.exists() or not looks_like_hub_id(text):
        raise IdealError(f"{path}: model directory not found")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(text, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError as err:
        if type(err).__name__ == "IncompleteSnapshotError":  # newer huggingface_hub tells it apart
            raise IdealError(
                f"{text}: its snapshot in the Hugging Face cache ({cache}) is incomplete; finish "
                f"the download first: hf download {text}"
            ) from None
        raise IdealError(
            f"{text}: not a local directory and not in the Hugging Face cache ({cache}); "
            f"download it first: hf download {text}"
        ) from None


def _model_dir(path: str | Path) -> Path:
    path = resolve_model_dir(path)
    if not (path / "config.json").is_file() and not (path / ADAPTER_CONFIG).is_file():
        raise IdealError(f"{path}: not a Hugging Face model directory (no config.json)")
    return path


def adapter_base(path: Path) -> Path | None:
    """The base model directory of a peft adapter directory, or None for a plain model."""
    if not (path / ADAPTER_CONFIG).is_file():
        return None
    try:
        base = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as err:
        raise IdealError(
            f"{path / ADAPTER_CONFIG}:{err.lineno}: invalid JSON ({err.msg})"
        ) from None
    if not base:
        raise IdealError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path")
    try:
        return resolve_model_dir(base)
    except IdealError as err:
        raise IdealError(f"{path / ADAPTER_CONFIG}: base model {err}") from None


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft wraps a model by reading `is_gradient_checkpointing`, which transformers 5 deprecates
    with a FutureWarning on every wrap; nothing there for our users to act on, so it is hidden
    here (only that warning, only around peft's calls)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a model directory (of its base model, for an adapter without one)."""
    path = _model_dir(path)
    base = adapter_base(path)
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


def load_causal_lm(path: str | Path, dtype: torch.dtype | str | None = None) -> PreTrainedModel:
    """A local causal LM, or a peft adapter over one; another kind of model is a clear error.
    `dtype` None: ROUND_DTYPE (float32), whatever the checkpoint's; "auto": the checkpoint's."""
    path = _model_dir(path)
    base = adapter_base(path)
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
            config_dir, dtype=dtype or ROUND_DTYPE, local_files_only=True
        )
        if base is not None:
            from peft import PeftModel

            with quiet_peft():
                model = PeftModel.from_pretrained(model, path, is_trainable=False)
        return model
    except (OSError, ValueError) as err:
        raise IdealError(f"{path}: cannot load the model ({_first_line(err)})") from None
