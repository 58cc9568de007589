"""Presets over the command trainer: LLaMA-Factory, axolotl and the TRL CLI.

    train: {backend: llamafactory, base_config: lf-base.yaml}      # llamafactory-cli train {config}
    train: {backend: axolotl, base_config: axolotl-base.yaml}      # axolotl train {config}
    train: {backend: trl-cli, base_config: trl-base.yaml}          # trl sft --config {config}

Each round, the user's base YAML is copied with the keys that say what to train on patched in (the
base model, the round's export written by `ideal export`, the output directory) and written to
RUN/round-K/trainer.yaml, which `{config}` names. `train.command` replaces the default command (to
add a launcher, for instance); `train.env` adds environment variables (`FORCE_TORCHRUN: "1"`).

Each round warns where the tool's rendering or loss masking is known to differ from how `ideal`
renders rows for the influence step (masking.py: the tokenizer's chat template; loss on every
assistant turn and its end-of-turn token, never on prompts), and each renderer where a setting would
change the round's volumes (held-out splits, sample caps). They are logged and kept in
RUN/round-K/train.json (`warnings`); `ideal check --config` prints the first kind before a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ideal.artifacts import atomic_write_text
from ideal.backends.protocol import TrainJob
from ideal.backends.tools.external import CommandTrainer, Prepared
from ideal.backends.tools.masking import masking_warnings
from ideal.errors import IdealError

#: preset -> (the export format it reads, its default command)
PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llamafactory": ("llamafactory", ("llamafactory-cli", "train", "{config}")),
    "axolotl": ("axolotl", ("axolotl", "train", "{config}")),
    "trl-cli": ("trl", ("trl", "sft", "--config", "{config}")),
}


def load_base_config(path: str | Path | None, preset: str) -> dict[str, Any]:
    if path is None:
        raise IdealError(f"train.backend {preset}: give train.base_config, your {preset} YAML")
    path = Path(path)
    if not path.is_file():
        raise IdealError(f"{path}: train.base_config not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise IdealError(f"{path}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise IdealError(f"{path}: expected a mapping at the top level")
    return data


def _replaced(base: dict[str, Any], key: str, value: Any, tool: str) -> list[str]:
    if key in base and base[key] != value:
        return [f"{tool}: `{key}: {base[key]}` of the base config is replaced by `{value}`"]
    return []


def render_llamafactory(
    base: dict[str, Any], job: TrainJob, data_dir: Path, output_dir: Path
) -> tuple[dict[str, Any], list[str]]:
    info = json.loads((data_dir / "dataset_info.json").read_text(encoding="utf-8"))
    warnings: list[str] = []
    config = dict(base)
    for key in ("interleave_probs", "max_samples"):
        if key in config:
            warnings.append(
                f"llamafactory: `{key}` removed: it would change the round's volumes (the export "
                "repeats each row as counted, concatenated)"
            )
            config.pop(key)
    warnings += _replaced(base, "stage", "sft", "llamafactory")
    warnings += _replaced(base, "mix_strategy", "concat", "llamafactory")
    if base.get("val_size"):
        warnings.append(
            f"llamafactory: `val_size: {base['val_size']}` holds out part of the round's mixture"
        )
    config.update(
        model_name_or_path=str(job.base_model.resolve()),
        stage="sft",
        do_train=True,
        dataset_dir=str(data_dir.resolve()),
        dataset=",".join(sorted(info)),
        mix_strategy="concat",
        output_dir=str(output_dir.resolve()),
    )
    return config, warnings


def render_axolotl(
    base: dict[str, Any], job: TrainJob, data_dir: Path, output_dir: Path
) -> tuple[dict[str, Any], list[str]]:
    exported = yaml.safe_load((data_dir / "datasets.yaml").read_text(encoding="utf-8"))
    warnings: list[str] = []
    if base.get("datasets"):
        warnings.append("axolotl: the base config's `datasets` are replaced by the round's export")
    if base.get("val_set_size"):
        warnings.append(
            f"axolotl: `val_set_size: {base['val_set_size']}` holds out part of the round's mixture"
        )
    datasets = [  # the export's paths are relative to its directory
        {**entry, "path": str((data_dir / entry["path"]).resolve()),
         "roles_to_train": ["assistant"], "train_on_eos": "turn"}
        for entry in exported["datasets"]
    ]  # fmt: skip
    config = dict(base)
    config.update(
        base_model=str(job.base_model.resolve()),
        datasets=datasets,
        dataset_prepared_path=str((job.mixture_dir / "axolotl-prepared").resolve()),
        output_dir=str(output_dir.resolve()),
    )
    return config, warnings


def render_trl_cli(
    base: dict[str, Any], job: TrainJob, data_dir: Path, output_dir: Path
) -> tuple[dict[str, Any], list[str]]:
    exported = yaml.safe_load((data_dir / "mixture.yaml").read_text(encoding="utf-8"))
    warnings: list[str] = []
    config = dict(base)
    if "dataset_name" in config:
        warnings.append("trl-cli: `dataset_name` removed: the round's export is the dataset")
        config.pop("dataset_name")
    if base.get("datasets"):
        warnings.append("trl-cli: the base config's `datasets` are replaced by the round's export")
    if any("fraction" in (e or {}) for e in base.get("datasets") or []):
        warnings.append("trl-cli: dataset `fraction`s dropped: the export repeats rows as counted")
    config.setdefault("assistant_only_loss", True)  # TRL's default (False) trains on prompts too
    config.update(
        model_name_or_path=str(job.base_model.resolve()),
        datasets=[  # the export's paths are relative to its directory
            {**e, "data_files": str((data_dir / e["data_files"]).resolve())}
            for e in exported["datasets"]
        ],
        dataset_train_split="train",
        output_dir=str(output_dir.resolve()),
    )
    return config, warnings


RENDERERS = {
    "llamafactory": render_llamafactory,
    "axolotl": render_axolotl,
    "trl-cli": render_trl_cli,
}


def preset_trainer(
    preset: str,
    base_config: str | Path | None,
    command: str | tuple[str, ...] | list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    max_length: int | None = None,
    parity: str = "auto",
) -> CommandTrainer:
    """A CommandTrainer that renders `preset`'s YAML from `base_config` before each round and,
    with `parity` (auto: when the tool imports in the command's environment; on; off), compares
    the rows its data pipeline builds with ideal's (`max_length`) before it trains."""
    if preset not in PRESETS:
        raise IdealError(f"unknown trainer preset {preset!r}; choose from {', '.join(PRESETS)}")
    export_format, default_command = PRESETS[preset]
    base = load_base_config(base_config, preset)  # read now: a bad file fails before round 0
    renderer = RENDERERS[preset]
    where = str(base_config)

    def render(job: TrainJob, data_dir: Path, output_dir: Path, config_path: Path) -> list[str]:
        if preset == "axolotl":  # its deduplication would undo the mixture's repeats
            from ideal.backends.tools.trainer_rows import check_deduplication
            from ideal.data.rows import read_jsonl

            rows = (e for f in sorted(data_dir.glob("*.jsonl")) for e in read_jsonl(f)[0])
            check_deduplication(base, where, rows, f"round {job.round}'s mixture")
        config, warnings = renderer(base, job, data_dir, output_dir)
        atomic_write_text(config_path, yaml.safe_dump(config, sort_keys=False))
        return masking_warnings(preset, base, where, job.base_model) + warnings

    def check(job: TrainJob, prepared: Prepared) -> dict[str, Any] | None:
        from ideal.backends.tools.parity_run import preset_parity

        return preset_parity(preset, base, job, prepared, max_length, parity)

    return CommandTrainer(
        command=command or default_command,
        export_format=export_format,
        env=dict(env or {}),
        timeout=timeout,
        name=preset,
        loss="token",
        render=render,
        check=None if parity == "off" else check,
    )
