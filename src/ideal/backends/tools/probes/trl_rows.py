"""TRL's data preparation over a round's export, as `trl sft --config` runs it (probes/__init__.py
has the JSON written).

    <TRL's python> trl_rows.py TRAINER_YAML OUT_JSON

The config is parsed by TRL's own parser (`trl sft`'s dataclasses), each dataset of its `datasets`
list loaded by TRL's `get_dataset`, tokenized by SFTTrainer's own preparation (its chat template,
swapped for its training template under assistant_only_loss as SFTTrainer does, truncation to
max_length) and collated by its own collator, which turns the assistant and completion masks into
labels. No model is loaded: the trainer object carries only what the preparation reads.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def main(argv: list[str]) -> int:
    config_path, out_path = argv
    import trl
    import yaml
    from transformers import AutoTokenizer
    from trl import DatasetMixtureConfig, SFTTrainer, get_dataset
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers
    from trl.scripts.sft import make_parser
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    with open(config_path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    with tempfile.TemporaryDirectory() as scratch:
        config["output_dir"] = os.path.join(scratch, "out")
        path = os.path.join(scratch, "config.yaml")
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(config, handle)
        script, args, model_args, mixture = make_parser().parse_args_and_config(
            ["--config", path], fail_with_unknown_args=False
        )
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = args.pad_token or tokenizer.eos_token
        # what SFTTrainer.__init__ sets before it prepares a dataset
        trainer = SFTTrainer.__new__(SFTTrainer)
        trainer._tokenizer = tokenizer
        trainer.chat_template = None
        if args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
            trainer.chat_template = get_training_chat_template(tokenizer)
        collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
        trained = len(get_dataset(mixture)[script.dataset_train_split])
        datasets = []
        for entry in mixture.datasets:
            rows = get_dataset(DatasetMixtureConfig(datasets=[entry]))[script.dataset_train_split]
            sample = next(iter(rows))
            if args.completion_only_loss is None:
                trainer.completion_only_loss = "prompt" in sample and "completion" in sample
            else:
                trainer.completion_only_loss = args.completion_only_loss
            prepared = trainer._prepare_dataset(rows, tokenizer, args, False, None, "train")
            kept = []
            for index, row in enumerate(prepared):
                batch = collator([row])
                kept.append(
                    {
                        "index": index,
                        "input_ids": batch["input_ids"][0].tolist(),
                        "labels": batch["labels"][0].tolist(),
                    }
                )
            datasets.append(
                {"file": str(entry.data_files), "rows": len(rows), "kept": kept, "dropped": []}
            )
        document = {
            "tool": "trl",
            "version": trl.__version__,
            "datasets": datasets,
            "trained": trained,
            "notes": [
                f"assistant_only_loss {args.assistant_only_loss}",
                f"max_length {args.max_length}",
            ],
        }
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump(document, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
