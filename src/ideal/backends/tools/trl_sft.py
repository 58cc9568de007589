"""TRL's SFTTrainer in this process: `train.backend: trl` (optional extra `pip install 'ideal-mix[trl]'`).

    train: {backend: trl, epochs: 1, lr: 2.0e-5, batch_size: 8, grad_accum: 4, lora: true,
            trl_args: {packing: false, lr_scheduler_type: cosine}}     # more SFTConfig fields

The round's rows are tokenized by ideal (the tokenizer's chat template, loss on assistant tokens and
EOS, ideal's truncation) and handed to TRL pre-tokenized (`input_ids` + `labels`), so TRL trains on
exactly the tokens and masks that the influence step sees. What differs from the builtin loop is
TRL's: the loss of an optimizer step is the token mean over the whole step (every micro-batch and
process), which train.json records as `loss: token`. `train.loss_normalization` is the builtin
loop's setting and is not used here. The fields of `train` map onto SFTConfig (lr ->
learning_rate, batch_size -> per_device_train_batch_size, warmup_ratio -> warmup_steps, ...);
`trl_args` overrides any of them. A killed round trains again from the start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ideal.artifacts import atomic_write_json
from ideal.backends.protocol import TrainJob
from ideal.backends.tools.masking import trl_warnings
from ideal.backends.training.builtin import TrainSettings, lora_config
from ideal.distributed import barrier, init_from_env, is_main
from ideal.errors import IdealError

log = logging.getLogger(__name__)


def sft_config_values(settings: TrainSettings, output_dir: Path) -> dict[str, Any]:
    """Our training settings as SFTConfig keyword arguments (before `trl_args`)."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "output_dir": str(output_dir),
        "num_train_epochs": settings.epochs,
        "max_steps": settings.max_steps if settings.max_steps is not None else -1,
        "learning_rate": settings.lr,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "warmup_steps": settings.warmup_ratio,  # a float in [0, 1) is a ratio of the steps
        "weight_decay": settings.weight_decay,
        "max_grad_norm": settings.max_grad_norm,
        "lr_scheduler_type": "cosine",
        "optim": "sgd" if settings.optimizer == "sgd" else "adamw_torch",
        "seed": settings.seed,
        "max_length": None,  # rows arrive truncated by ideal (keeping the prompt's end)
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": not cuda,
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "activation_checkpointing": False,
    }


@dataclass
class TrlTrainer:
    settings: TrainSettings
    options: dict[str, Any] = field(default_factory=dict)  # train.trl_args
    name: str = "trl"
    loss: str = "token"
    all_processes: bool = True  # TRL runs DDP itself under torchrun / accelerate launch

    def train(self, job: TrainJob) -> dict[str, Any]:
        try:
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer
        except ImportError:
            raise IdealError("train.backend trl needs TRL: pip install 'ideal-mix[trl]'") from None
        import torch

        from ideal.data.mixture_io import load_training_set
        from ideal.data.rows import tokenize_examples
        from ideal.hf import load_causal_lm, load_tokenizer

        init_from_env()
        warnings = trl_warnings(self.options, str(job.config_file))
        for warning in warnings if is_main() else []:
            log.warning("round %d: %s", job.round, warning)
        settings, out = self.settings, job.output_dir
        partial = out.with_name(out.name + ".partial")
        if is_main():
            shutil.rmtree(partial, ignore_errors=True)  # no resume inside a TRL run: start again
        barrier()
        if settings.threads:
            torch.set_num_threads(settings.threads)
        training = load_training_set(job.mixture_dir)
        tokenizer = load_tokenizer(job.base_model)
        model = load_causal_lm(job.base_model, dtype=torch.float32)
        examples = [ex for d in training.mixture.domains for ex in training.examples(d)]
        items, report = tokenize_examples(examples, tokenizer, settings.max_length)
        dataset = Dataset.from_dict(
            {"input_ids": [i.input_ids for i in items], "labels": [i.labels for i in items]}
        )
        values = {**sft_config_values(settings, partial / "trl"), **self.options}
        try:
            args = SFTConfig(**values)
        except (TypeError, ValueError) as err:
            raise IdealError(f"train.trl_args: {str(err).splitlines()[0]}") from None
        peft_config = None
        if settings.lora:
            peft_config = lora_config(settings)
        start = time.perf_counter()
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
        trainer.train()
        seconds = time.perf_counter() - start
        final = partial / "final"
        trainer.save_model(str(final))  # every process calls it; the main one writes
        record = {
            "backend": self.name,
            "loss": self.loss,
            "seconds": seconds,
            "steps": trainer.state.global_step,
            "examples": len(items),
            "target_tokens": report.target_tokens,
            "truncated": report.truncated,
            "warnings": warnings,
            "sft_config": {k: v for k, v in values.items() if k != "output_dir"},
        }
        if is_main():
            tokenizer.save_pretrained(final)
            if settings.lora:  # the adapter points at its base model directory
                config_path = final / "adapter_config.json"
                config = json.loads(config_path.read_text())
                config["base_model_name_or_path"] = str(job.base_model.resolve())
                config_path.write_text(json.dumps(config, indent=2))
            history = [h for h in trainer.state.log_history if "loss" in h]
            (final / "train_log.jsonl").write_text(
                "".join(json.dumps(h) + "\n" for h in history), encoding="utf-8"
            )
            atomic_write_json(
                final / "train_settings.json", {**record, "settings": asdict(settings)}
            )
            os.replace(final, out)
            shutil.rmtree(partial, ignore_errors=True)
        barrier()
        return record
