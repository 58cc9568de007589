"""What the influence step will hold in memory, before any heavy work: `ideal influence --plan`.

Works from the model's config alone: the model is built on the meta device (no weights are read or
allocated), so an 8B-parameter config plans in seconds on a laptop. Sizes follow what
`ideal.influence.engine` and its passes allocate for a selected layer of shape (out, in), k
references and `chunk` examples per per-example-gradient chunk:

    covariances A (in x in) and S (out x out)        float64   host (`--factors device`: device)
    eigenvectors Q_A, Q_S (same shapes)               float32   host; device during the correction
    eigenvalue table Lambda (out x in)                float32 (+ its float64 running sum)
    reference gradients (k, out, in)                  float32   host, freed once preconditioned
    reference directions v_j (k, out, in)             float32   device, during the domain passes
    refinement r, z, p, A p (4 x (k, out, in))        float32   device, `--refine K` only

Covariances and eigenvectors are freed once a layer group's directions exist, so the device holds,
per group, the larger of its eigenvectors + eigenvalues (correction pass) and its directions
(domain passes), plus the model and the transients of one layer (one chunk of per-example
gradients and their rotations; the float64 preconditioning of one layer). With a budget
(`--memory`), layers are grouped in model order so that each group fits; each group costs one pass
over the references, one or two over the curvature sample and one over every domain's sample;
`--refine K` adds K + 1 Gauss-Newton products (refine.py), each a dual forward and a backward over
the curvature sample repeated once per reference.
Activations of one batch come on top (they depend on the sequence lengths, not on the plan).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ideal.errors import IdealError
from ideal.influence.capture import layer_shape, select_layers
from ideal.report.console import human

F64, F32 = 8, 4
UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6,
         "mib": 2**20, "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12,
         "tib": 2**40}  # fmt: skip


def parse_size(size: str | int) -> int:
    """Bytes of '70GiB', '80GB', '512MiB' or a plain number of bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(size))
    if not match or match.group(2).lower() not in UNITS:
        raise IdealError(f"--memory: cannot read {size!r} as a size (e.g. 70GiB, 80GB, 512MiB)")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class LayerPlan:
    name: str
    d_out: int
    d_in: int
    covariances: int  # bytes, float64 (host), freed after the eigendecomposition
    eigenvectors: int  # Q_A, Q_S float32 (host; a device copy during the correction pass)
    eigenvalues: int  # Lambda float32 (host; a device copy during the correction pass)
    correction: int  # the running float64 sum of the EK-FAC correction (host)
    references: int  # k reference gradients, float32 (host), until preconditioned
    directions: int  # k preconditioned directions, float32 (device, during the domain passes)
    transient: int  # the largest short-lived device tensors while this layer is processed
    refinement: int = 0  # --refine: r, z, p, A p beside the directions, float32 (device)

    @property
    def host(self) -> int:
        """Host bytes at this layer's peak: the reference gradients, with the covariances (before
        the eigendecomposition) or the eigenbasis and the correction (after it)."""
        return self.references + max(
            self.covariances, self.eigenvectors + self.eigenvalues + self.correction
        )

    @property
    def device(self) -> int:
        """Device bytes this layer holds for its whole group's pass (correction or domains)."""
        return max(self.eigenvectors + self.eigenvalues, self.directions + self.refinement)


def layer_plan(
    name: str, d_out: int, d_in: int, references: int, curvature: str, chunk: int, refine: int = 0
) -> LayerPlan:
    factored = curvature in ("ekfac", "kfac")
    square = d_in * d_in + d_out * d_out
    matrix = d_out * d_in
    # per-example gradients and their rotations/squares of one chunk, float32; preconditioning of
    # one layer in float64 (k gradients, their rotation, the eigenvectors upcast)
    per_example = 2 * chunk * matrix * F32
    precondition = (2 * references * matrix + square) * F64 if factored else 0
    return LayerPlan(
        name,
        d_out,
        d_in,
        covariances=square * F64 if factored else 0,
        eigenvectors=square * F32 if factored else 0,
        eigenvalues=matrix * F32 if factored else 0,
        correction=matrix * F64 if curvature == "ekfac" else 0,
        references=references * matrix * F32,
        directions=references * matrix * F32,
        transient=max(per_example, precondition),
        refinement=4 * references * matrix * F32 if refine else 0,
    )


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
    references: int,
    curvature: str = "ekfac",
    chunk: int = 16,
    refine: int = 0,
) -> list[LayerPlan]:
    """Bytes per selected layer held by the influence step (see the module docstring)."""
    return [
        layer_plan(name, *layer_shape(module), references, curvature, chunk, refine)
        for name, module in select_layers(model, patterns).items()
    ]


def model_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the model's weights (in `dtype` if given: bf16 for a GPU plan)."""
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    return sum(p.numel() * (size or p.element_size()) for p in model.parameters())


def group_plans(plans: list[LayerPlan], budget: int | None, fixed: int) -> list[list[LayerPlan]]:
    """Layers in model order, grouped so that each group's device peak fits `budget` (None: one
    group); `fixed` is what the device holds anyway (the model)."""
    if budget is None:
        return [plans]
    transient = max(p.transient for p in plans)
    room = budget - fixed - transient
    groups: list[list[LayerPlan]] = [[]]
    for p in plans:
        if p.device > room:
            raise IdealError(
                f"--memory {human(budget)}: layer {p.name} alone needs {human(fixed + transient + p.device)} "
                "of device memory (model, its statistics and one chunk); give more memory, fewer "
                "references or a smaller --batch-size"
            )
        if sum(q.device for q in groups[-1]) + p.device > room:
            groups.append([])
        groups[-1].append(p)
    return groups


@dataclass(frozen=True)
class MemoryPlan:
    layers: list[LayerPlan]
    groups: list[list[LayerPlan]]
    model: int  # bytes of the weights on the device
    curvature: str
    refine: int = 0  # --refine K: K + 1 Gauss-Newton products per group

    @property
    def peak_device(self) -> int:
        transient = max(p.transient for p in self.layers)
        return self.model + transient + max(sum(p.device for p in g) for g in self.groups)

    @property
    def peak_host(self) -> int:
        return max(sum(p.host for p in g) for g in self.groups)

    @property
    def passes(self) -> dict[str, int]:
        """Passes over each kind of data: every group runs its own."""
        curvature = {"ekfac": 2, "kfac": 1, "exact": 1, "identity": 0}[self.curvature]
        n = len(self.groups)
        passes = {"references": n, "curvature sample": curvature * n, "each domain's sample": n}
        if self.refine:  # each product: a dual forward and a backward, one copy per reference
            passes["the curvature sample x references (refinement)"] = (self.refine + 1) * n
        return passes


def memory_plan(
    model: nn.Module,
    patterns: list[str] | None,
    references: int,
    curvature: str = "ekfac",
    budget: int | None = None,
    weights_dtype: torch.dtype | None = None,
    chunk: int = 16,
    refine: int = 0,
) -> MemoryPlan:
    plans = plan_influence(model, patterns, references, curvature, chunk, refine)
    weights = model_bytes(model, weights_dtype)
    return MemoryPlan(plans, group_plans(plans, budget, weights), weights, curvature, refine)


def layer_groups(
    model: nn.Module, layers: dict[str, Any], references: int, budget: int, settings: Any
) -> list[list[str]]:
    """The layer groups of a run on a loaded model (weights as loaded) within `budget` bytes."""
    plans = [
        layer_plan(
            name, *layer_shape(m), references, settings.curvature, settings.chunk, settings.refine
        )
        for name, m in layers.items()
    ]
    return [[p.name for p in g] for g in group_plans(plans, budget, model_bytes(model))]


def job_plan(model_dir: str | Path, reference: str | Path, job: Any) -> tuple[MemoryPlan, int, int]:
    """`ideal influence --plan`: the plan of an InfluenceJob on a model's config alone, with bf16
    weights (what a GPU holds; a CPU run holds the config's dtype); returns (plan, references,
    parameters)."""
    from ideal.data.rows import load_domains

    references = len(load_domains(reference))
    network = meta_model(model_dir)
    config, settings = job.config, job.settings
    budget = parse_size(config.memory) if config.memory is not None else None
    plan = memory_plan(network, job.layers, references, settings.curvature, budget,
                       torch.bfloat16, settings.chunk, settings.refine)  # fmt: skip
    return plan, references, sum(t.numel() for t in network.parameters())
