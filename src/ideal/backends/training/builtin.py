"""Supervised fine-tuning: our own readable loop on Hugging Face Accelerate (full or LoRA).

    ideal train --model BASE --train DATA --out MODEL [--epochs 1] [--lr 2e-5] [--lora] [--resume]
                [--top-layers K]

The same code runs on one CPU, one GPU, and (issue 7) several processes under `accelerate launch`.
AdamW (or plain SGD), linear warmup then cosine decay, gradient clipping, gradient accumulation. The loss of an
optimizer step is normalised over the WHOLE step before any micro-batch is run, so the result does
not depend on how a step is split into micro-batches:

    "example" (default): mean over the step's examples of l(z) = mean target NLL of z, the training
                         objective L_mix of docs/method.md (what the influence step differentiates);
    "token":             sum of target-token NLL over the step / its number of target tokens.

The data order is a pure function of (seed, epoch), so a run killed mid-way resumes from its last
checkpoint (weights, optimizer, scheduler, RNG, step) and ends with the same weights as an
uninterrupted run. Work in progress lives in `<out>.partial/`; the finished model directory appears
at `<out>` in one rename.

Why our own loop when TRL exists (`train.backend: trl`): TRL, LLaMA-Factory and axolotl normalise
the loss per token over the step; this loop also offers the per-example normalisation that
docs/method.md's L_mix defines and the influence step differentiates by default, plus resumption to
bit-identical weights. Where neither matters, the other backends train the round just as well.

`--top-layers K` trains only the top K blocks, from the hidden states entering them, computed once
per row and cached in `<out>.features/` (or the run's `features/`): ideal.backends.training.top_layers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ideal.artifacts import atomic_write_json, writing
from ideal.backends.settings import TrainSettings
from ideal.data.rows import OnInvalid, Tokenized, tokenize_examples
from ideal.distributed import barrier, init_from_env, is_main
from ideal.errors import IdealError
from ideal.lm import collate, target_nll

if TYPE_CHECKING:
    from ideal.backends.training.top_layers import FeatureCache

log = logging.getLogger(__name__)


def step_examples(step: int, examples: int, settings: TrainSettings) -> list[int]:
    """Indices of the examples of optimizer step `step`: epochs are seeded permutations, laid end to end."""
    per_step = settings.examples_per_step
    start, out = step * per_step, []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), examples)
        order = np.random.default_rng([settings.seed, epoch]).permutation(examples)
        out.extend(order[offset : offset + per_step - len(out)].tolist())
    return out


def step_loss_normaliser(items: list[Tokenized], settings: TrainSettings) -> float:
    if settings.loss_normalization == "token":
        return float(sum(item.num_targets for item in items))
    return float(len(items))


def micro_batch_loss(
    model: nn.Module,
    items: list[Tokenized],
    pad_id: int,
    normaliser: float,
    settings: TrainSettings,
    full_logits: bool = False,
    features: FeatureCache | None = None,
) -> tuple[torch.Tensor, int]:
    """This micro-batch's share of the step loss (already divided by the step's normaliser).

    The head runs at the target positions only (`ideal.lm.target_nll`); `full_logits` applies it at
    every position, as before (the same loss up to round-off: for comparisons and benchmarks).
    With `settings.top_layers` only the top blocks run, from `features` (the cached states that
    enter them), or from the frozen bottom run here under no_grad when there is no cache."""
    device = next(model.parameters()).device
    batch = collate(items, pad_id).to(device)
    if features is not None:  # the top blocks from the cached states entering them
        targets = features.target_logits(model, batch, full=full_logits)
        nll, mask = targets.nll(batch.labels), targets.mask
    elif settings.top_layers:  # the same, the frozen bottom run here under no_grad
        from ideal.backends.training.top_layers import bottom_states, top_blocks

        states = bottom_states(model, batch, settings.top_layers)  # (B, T, hidden)
        with top_blocks(model, settings.top_layers):
            nll, mask = target_nll(model, batch, full=full_logits, inputs_embeds=states)
    else:
        nll, mask = target_nll(model, batch, full=full_logits)  # (B, T-1) each
    if settings.loss_normalization == "token":
        total = nll.sum()
    else:
        total = (nll.sum(1) / mask.sum(1).clamp_min(1)).sum()
    return total / normaliser, int(batch.attention_mask.sum())


def lora_config(settings: TrainSettings, model: nn.Module | None = None) -> Any:
    """peft's LoraConfig for the settings (also what the trl backend hands to SFTTrainer). With
    `settings.top_layers`, the adapter wraps only the top blocks of `model`: "all-linear" becomes
    the names of their linear layers, other names are restricted by `layers_to_transform`."""
    from peft import LoraConfig

    targets: Any = (
        settings.lora_targets[0]
        if settings.lora_targets == ("all-linear",)
        else list(settings.lora_targets)
    )
    restrict: dict[str, Any] = {}
    if settings.top_layers and model is not None:
        from ideal.backends.training.top_layers import top_block_indices, top_linear_names

        if targets == "all-linear":
            targets = top_linear_names(model, settings.top_layers)
        else:
            restrict = {
                "layers_to_transform": top_block_indices(model, settings.top_layers),
                "layers_pattern": "layers",
            }
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        **restrict,
    )


def wrap_lora(model: nn.Module, settings: TrainSettings) -> nn.Module:
    from peft import get_peft_model

    from ideal.hf import quiet_peft

    config = lora_config(settings, model)
    try:
        with quiet_peft():
            return get_peft_model(model, config)
    except ValueError as err:
        raise IdealError(f"--lora: {str(err).splitlines()[0]}") from None


@dataclass
class Checkpoint:
    path: Path

    @property
    def file(self) -> Path:
        return self.path / "state.pt"

    def save(
        self, step: int, model: nn.Module, optimizer: Any, scheduler: Any, seconds: float = 0.0
    ) -> None:
        """The state after `step` steps, and the `seconds` those steps took (a resumed training
        reports them all)."""
        trainable = {
            n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        state = {
            "step": step,
            "seconds": seconds,
            "trainable": trainable,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        with writing(self.file, cleanup=tmp):
            torch.save(state, tmp)
        os.replace(tmp, self.file)  # a kill during the save leaves the previous checkpoint

    def load(self, model: nn.Module, optimizer: Any, scheduler: Any) -> tuple[int, float]:
        """The saved state into model, optimizer and scheduler; returns its step and the seconds
        spent reaching it (0 in a checkpoint from before they were kept)."""
        state = torch.load(self.file, map_location="cpu", weights_only=False)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return int(state["step"]), float(state.get("seconds", 0.0))


@dataclass
class TrainResult:
    model: nn.Module
    steps: int
    log: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # the steps', not the feature cache's fill
    fill_seconds: float = 0.0  # computing the cached features of the rows (train.top_layers)


StepCallback = Callable[[dict[str, float]], None]


def train_model(
    model: nn.Module,
    items: list[Tokenized],
    settings: TrainSettings,
    pad_id: int,
    checkpoint: Checkpoint | None = None,
    on_step: StepCallback | None = None,
    feature_dir: str | Path | None = None,
) -> TrainResult:
    """Fine-tune `model` on `items` (already resampled: one entry per copy). Resumes from `checkpoint`.

    With `settings.top_layers` (and `feature_cache`) the features of the rows are cached under
    `feature_dir` (None: in memory, for this call only)."""
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    if not items:
        raise IdealError("no training examples")
    if settings.examples_per_step < int(os.environ.get("WORLD_SIZE", "1")):
        raise IdealError("--batch-size x --grad-accum must be at least the number of processes")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    use_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    accelerator = Accelerator(
        mixed_precision="bf16" if use_bf16 else "no", cpu=not torch.cuda.is_available()
    )
    features = None
    if settings.top_layers:
        from ideal.backends.training.top_layers import FeatureCache, check_top_layers, freeze_below

        check_top_layers(model, settings.top_layers)
        if settings.feature_cache:  # the frozen bottom's hash, before any adapter is added
            features = FeatureCache(
                feature_dir, model, settings.top_layers, settings.max_length,
                autocast=torch.bfloat16 if use_bf16 else None,  # the training forward's
            )  # fmt: skip
        if not settings.lora:
            freeze_below(model, settings.top_layers)
    if settings.lora:
        model = wrap_lora(model, settings)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (
        torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        if settings.optimizer == "adamw"
        else torch.optim.SGD(params, lr=settings.lr, weight_decay=settings.weight_decay)
    )
    total = settings.total_steps(len(items))
    warmup = round(settings.warmup_ratio * total)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    if features is not None:  # the main process computes and writes; the others then read
        with accelerator.autocast():
            seconds = features.fill_shared(model, items, pad_id, settings.batch_size)
            if seconds:
                log.info("feature cache: computed in %.1f s", seconds)
    start_step, spent = 0, 0.0  # spent: the seconds of the steps before a resume
    if checkpoint is not None and checkpoint.file.is_file():
        start_step, spent = checkpoint.load(accelerator.unwrap_model(model), optimizer, scheduler)
        log.info("resumed from step %d of %d", start_step, total)
    records: list[dict[str, float]] = []
    began = time.perf_counter()
    for step in range(start_step, total):
        tick = time.perf_counter()
        chosen = [items[i] for i in step_examples(step, len(items), settings)]
        # Under DDP each process takes a disjoint share of the step; gradients are averaged over
        # processes, so the step normaliser is divided by their number to keep the same loss.
        normaliser = step_loss_normaliser(chosen, settings) / accelerator.num_processes
        local = chosen[accelerator.process_index :: accelerator.num_processes]
        micro = [
            local[s : s + settings.batch_size] for s in range(0, len(local), settings.batch_size)
        ]
        loss_value, tokens = 0.0, 0
        for k, part in enumerate(micro):
            last = k == len(micro) - 1
            with nullcontext() if last else accelerator.no_sync(model):
                with accelerator.autocast():
                    # features only when cached: a stand-in micro_batch_loss may not take them
                    cached = {} if features is None else {"features": features}
                    loss, n_tokens = micro_batch_loss(
                        model, part, pad_id, normaliser, settings, **cached
                    )
                accelerator.backward(loss)
            loss_value += float(loss.detach())
            tokens += n_tokens
        if accelerator.num_processes > 1:  # the step's loss and tokens over every process
            summed = accelerator.reduce(
                torch.tensor([loss_value, tokens], device=accelerator.device), reduction="sum"
            )
            loss_value, tokens = float(summed[0]) / accelerator.num_processes, int(summed[1])
        grad_norm = accelerator.clip_grad_norm_(params, settings.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {
            "step": step + 1,
            "loss": loss_value,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens / max(time.perf_counter() - tick, 1e-9),
        }
        records.append(record)
        if on_step is not None:
            on_step(record)
        if (
            checkpoint is not None
            and settings.checkpoint_every
            and (step + 1) % settings.checkpoint_every == 0
            and step + 1 < total
        ):
            if accelerator.is_main_process:  # the same state on every process: one writer
                checkpoint.save(
                    step + 1, accelerator.unwrap_model(model), optimizer, scheduler,
                    spent + time.perf_counter() - began,
                )  # fmt: skip
            accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model)
    model.eval()
    filled = features.filled_seconds if features is not None else 0.0
    return TrainResult(model, total, records, spent + time.perf_counter() - began, filled)


def run_train(
    model_dir: str | Path,
    train: str | Path,
    out: str | Path,
    settings: TrainSettings = TrainSettings(),
    resume: bool = False,
    on_invalid: OnInvalid = "error",
    progress: bool = True,
    feature_dir: str | Path | None = None,
) -> TrainResult:
    """`ideal train`: base model + training directory (plain or mixture) -> fine-tuned model at `out`.

    With --top-layers the features are cached under `feature_dir` (default `<out>.features`),
    where later runs from the same base model find them."""
    from ideal.data.mixture_io import load_training_set
    from ideal.hf import load_causal_lm, load_tokenizer
    from ideal.progress import StepBar

    init_from_env()  # under torchrun / accelerate launch: join the group before any file work
    main = is_main()
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if out.exists():
        raise IdealError(f"{out}: already exists; choose another --out")
    # decided once, before the barrier: afterwards the main process creates `partial`, and
    # another process checking it then would find it without its settings yet (a race seen
    # under torchrun: "made with other settings or data" on a fresh run)
    existed = partial.exists()
    if existed and not resume:
        raise IdealError(
            f"{partial}: an earlier run stopped here; rerun with --resume, or remove it"
        )
    barrier()  # every process has checked before the main one creates anything
    training = load_training_set(train, on_invalid)
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, dtype=torch.float32)
    examples = [ex for domain in training.mixture.domains for ex in training.examples(domain)]
    items, report = tokenize_examples(examples, tokenizer, settings.max_length, on_invalid)
    if not items:
        raise IdealError(f"{train}: no training examples left")
    manifest = {
        "settings": asdict(settings),
        "settings_hash": settings.hash(),
        "base_model": str(Path(model_dir).resolve()),
        "train": {
            "path": str(Path(train).resolve()),
            "files": training.files,
            "volumes": training.mixture.volumes,
        },
        "examples": len(items),
        "tokens": report.tokens,
        "target_tokens": report.target_tokens,
        "truncated": report.truncated,
        "skipped_no_target": len(report.no_target),
        "threads": torch.get_num_threads(),
    }
    settings_file = partial / "train_settings.json"
    if existed:
        previous = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        if {k: previous.get(k) for k in ("settings_hash", "train", "base_model")} != {
            k: manifest[k] for k in ("settings_hash", "train", "base_model")
        }:
            raise IdealError(
                f"{partial}: made with other settings or data; remove it to start again"
            )
    checkpoint = Checkpoint(partial / "checkpoint")
    log_path = partial / "train_log.jsonl"
    total = settings.total_steps(len(items))
    start = 0
    if checkpoint.file.is_file():
        start = int(torch.load(checkpoint.file, map_location="cpu", weights_only=False)["step"])
    if main:
        partial.mkdir(parents=True, exist_ok=True)
        atomic_write_json(settings_file, manifest)
        kept = [
            line
            for line in (log_path.read_text().splitlines() if log_path.is_file() else [])
            if json.loads(line)["step"] <= start
        ]
        log_path.write_text("".join(f"{line}\n" for line in kept))
    barrier()

    with (
        StepBar(total, "train", start) if progress and main else nullcontext() as bar,
        open(log_path, "a") if main else nullcontext() as log_file,
    ):

        def on_step(record: dict[str, float]) -> None:
            if log_file is None:
                return
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if bar is not None:
                bar.update(
                    int(record["step"]), loss=record["loss"], **{"tok/s": record["tokens_per_s"]}
                )

        if feature_dir is None:
            feature_dir = out.with_name(out.name + ".features")
        result = train_model(
            model, items, settings, tokenizer.pad_token_id, checkpoint, on_step, feature_dir
        )

    if not main:
        barrier()  # the main process writes the model
        return result
    final = partial / "final"
    shutil.rmtree(final, ignore_errors=True)
    with writing(final, cleanup=final):
        result.model.save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
    if settings.lora:  # the adapter points at its base model directory
        config_path = final / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(Path(model_dir).resolve())
        config_path.write_text(json.dumps(config, indent=2))
    shutil.copy(log_path, final / "train_log.jsonl")
    atomic_write_json(
        final / "train_settings.json",
        {
            **manifest,
            "steps": result.steps,
            "seconds": result.seconds,
            "fill_seconds": result.fill_seconds,
        },  # fmt: skip
    )
    os.replace(final, out)
    shutil.rmtree(partial)
    barrier()
    return result


@dataclass
class BuiltinTrainer:
    """`train.backend: builtin`: this loop behind the trainer protocol (backends/protocol.py)."""

    settings: TrainSettings
    name: str = "builtin"
    all_processes: bool = True  # DDP: every process of the group trains

    @property
    def loss(self) -> str:
        return self.settings.loss_normalization

    def train(self, job: Any) -> dict[str, Any]:
        partial = job.output_dir.with_name(job.output_dir.name + ".partial")
        result = run_train(
            job.base_model,
            job.mixture_dir,
            job.output_dir,
            self.settings,
            resume=partial.exists(),
            feature_dir=job.features or job.run_dir / "features",  # the rounds share it
        )
        return {
            "backend": self.name,
            "loss": self.loss,
            "seconds": result.seconds,
            "steps": result.steps,
            "settings_hash": self.settings.hash(),
        }
