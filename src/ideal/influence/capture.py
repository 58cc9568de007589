"""Hooks on selected linear layers: their inputs on the forward pass, output gradients on the backward.

    with Capture(layers) as cap:
        loss = model(...).loss; cap.backward(loss)    # or loss.backward(): the hooks record too
        cap.inputs["model.layers.0.mlp.up_proj"]   # (B, T, in) [+1 column of ones with a bias]
        cap.grads["model.layers.0.mlp.up_proj"]    # (B, T, out)

The weight gradient of a batch is then sum_t g_t a_t^T, and per example likewise over its tokens.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ideal.errors import IdealError

DEFAULT_PATTERNS = ("*.mlp.*",)
LORA_PATTERNS = ("*.lora_A.*", "*.lora_B.*")


def is_peft_model(model: nn.Module) -> bool:
    return any("lora_A" in name for name, _ in model.named_modules())


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (transformers.pytorch_utils): a linear layer with its weight stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def select_layers(model: nn.Module, patterns: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """Linear layers (nn.Linear, or GPT-2's Conv1D) whose names match any shell-style pattern, in
    model order.

    Default: the MLP projections of every block; for a peft LoRA model, the LoRA adapter weights.
    """
    if patterns is None:
        patterns = LORA_PATTERNS if is_peft_model(model) else DEFAULT_PATTERNS
    patterns = [p.strip() for p in patterns if p.strip()]
    layers = {
        name: module
        for name, module in model.named_modules()
        if is_linear(module) and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    }
    if not layers:
        raise IdealError(
            f"--layers {','.join(patterns)}: no linear layer (nn.Linear or Conv1D) matches"
        )
    return layers


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of the layer's parameter matrix, with the bias as an extra input column.

    Always (out, in), also for a Conv1D, whose weight tensor is stored transposed (in, out)."""
    if is_conv1d(module):
        return module.nf, module.weight.shape[0] + (module.bias is not None)
    return module.out_features, module.in_features + (module.bias is not None)


class Capture:
    """Context manager that records inputs and output gradients of `layers`."""

    def __init__(self, layers: dict[str, nn.Linear]):
        self.layers = layers
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[
            str, torch.Tensor
        ] = {}  # in the autograd graph: differentiate w.r.t. these
        self.grads: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> Capture:
        for name, module in self.layers.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()
        self.grads.clear()

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Output gradients of `loss` for every layer, without computing any weight gradient.

        Differentiating w.r.t. the layers' outputs (not their weights) lets autograd skip every
        weight-gradient product; the weight gradient sum_t g_t a_t^T is formed only where needed.
        """
        names = list(self.outputs)
        grads = torch.autograd.grad(
            loss, [self.outputs[n] for n in names], retain_graph=retain_graph, allow_unused=True
        )
        for name, grad in zip(names, grads, strict=True):
            self.grads[name] = (
                torch.zeros_like(self.outputs[name]) if grad is None else grad.detach()
            )

    def _forward_hook(self, name: str):
        def hook(module: nn.Linear, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            a = args[0].detach()
            if module.bias is not None:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            self.inputs[name] = a
            if output.requires_grad:
                self.outputs[name] = output
                output.register_hook(self._grad_hook(name))

        return hook

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            self.grads[name] = grad.detach()

        return hook
