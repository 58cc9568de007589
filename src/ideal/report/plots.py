"""Plots people would rather see than read. Matplotlib with the Agg backend (no display needed)."""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SIGN_CONVENTION = (
    "s > 0 (blue): more of the domain is predicted to LOWER the reference loss (it helps)"
)


def noise_mask(scores: np.ndarray, stderr: np.ndarray | None, z: float = 2.0) -> np.ndarray:
    """True where a score is within `z` standard errors of zero (its sign is not established)."""
    scores = np.asarray(scores, dtype=np.float64)
    if stderr is None:
        return np.zeros(scores.shape, dtype=bool)
    return np.abs(scores) < z * np.asarray(stderr, dtype=np.float64)


def influence_heatmap(
    scores: np.ndarray,
    domains: Sequence[str],
    references: Sequence[str],
    path: str | Path,
    title: str,
    stderr: np.ndarray | None = None,
) -> Path:
    """references x domains heatmap, diverging around 0, each cell annotated with its score (and
    standard error); cells within 2 standard errors of zero are hatched and marked '~0?'."""
    scores = np.asarray(scores, dtype=np.float64)
    noisy = noise_mask(scores, stderr)
    limit = float(np.abs(scores).max()) or 1.0
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(domains), 1.6 + 0.8 * len(references)))
    image = ax.imshow(scores, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_yticks(range(len(references)), references)
    ax.set_xlabel("training domain i")
    ax.set_ylabel("reference j")
    for j in range(scores.shape[0]):
        for i in range(scores.shape[1]):
            color = "white" if abs(scores[j, i]) > 0.6 * limit else "black"
            text = f"{scores[j, i]:.3g}"
            if stderr is not None:
                text += f"\n+-{float(np.asarray(stderr)[j, i]):.2g}"
            if noisy[j, i]:
                text += " ~0?"
                ax.add_patch(plt.Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, hatch="///",
                                           edgecolor="grey", linewidth=0))  # fmt: skip
            ax.text(i, j, text, ha="center", va="center", fontsize=10, color=color)
    if stderr is not None:
        title += "; hatched ~0?: within 2 standard errors of zero"
    fig.colorbar(image, ax=ax, label="influence s_ji")
    ax.set_title(f"{title}\n{SIGN_CONVENTION}", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def weights_plot(
    steps: Sequence[int], weights: dict[str, Sequence[float]], path: str | Path, title: str
) -> Path:
    """Domain weights along a proxy run (one line per domain), with the uniform level dotted."""
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for domain, values in weights.items():
        ax.plot(steps, values, label=domain)
    ax.axhline(1.0 / max(1, len(weights)), color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("proxy step")
    ax.set_ylabel("domain weight")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Save as PNG through a temporary file and a rename (never a half-written image)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def inline_image(path: Path) -> str:
    """A PNG as a data URI: the page keeps its pictures when mailed alone."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
