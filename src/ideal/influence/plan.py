"""What the influence step will hold in memory, before any heavy work: `ideal influence --plan`.

Works from the model's config alone: the model is built on the meta device (no weights are read or
allocated), so an 8B-parameter config plans in seconds on a laptop. Sizes follow what
`ideal.influence.engine` allocates for every selected layer of shape (out, in):

    covariances A (in x in) and S (out x out)          float64
    eigenvectors Q_A, Q_S (same shapes)                 float64
    eigenvalue table Lambda (out x in)                  float64 (ekfac, kfac)
    gradient sums (out x in), one per domain and per reference        float32
    preconditioned reference gradients (out x in), one per reference  float64
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ideal.errors import IdealError
from ideal.influence.capture import layer_shape, select_layers

F64, F32 = 8, 4


@dataclass(frozen=True)
class LayerPlan:
    name: str
    d_out: int
    d_in: int
    covariances: int  # bytes
    eigenvectors: int
    eigenvalues: int
    gradients: int

    @property
    def total(self) -> int:
        return self.covariances + self.eigenvectors + self.eigenvalues + self.gradients


def meta_model(model_dir: str | Path) -> nn.Module:
    """The model of a local config.json, on the meta device: shapes without weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(model_dir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise IdealError(f"{path}: no config.json")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise IdealError(f"{path}: model type '{model_type}' is not a causal language model")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plan_influence(
    model: nn.Module,
    patterns: list[str] | None,
    domains: int,
    references: int,
    curvature: str = "ekfac",
) -> list[LayerPlan]:
    """Bytes per selected layer held by the influence step (see the module docstring)."""
    plans = []
    factored = curvature in ("ekfac", "kfac")
    for name, module in select_layers(model, patterns).items():
        d_out, d_in = layer_shape(module)
        square = (d_in * d_in + d_out * d_out) * F64
        plans.append(
            LayerPlan(
                name,
                d_out,
                d_in,
                covariances=square if factored else 0,
                eigenvectors=square if factored else 0,
                eigenvalues=d_out * d_in * F64 if factored else 0,
                gradients=d_out * d_in * ((domains + references) * F32 + references * F64),
            )
        )
    return plans


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"
