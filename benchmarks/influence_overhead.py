"""Influence step vs one SFT epoch, measured side by side on the same model and mixture.

    python benchmarks/influence_overhead.py [--sizes tiny,cpu] [--examples 200] [--threads 1]

For each model size, runs in fresh subprocesses (so that peak memory is per stage): one epoch of full
fine-tuning with AdamW over the whole mixture, and `ideal influence` (EK-FAC, default layers; sampled
Fisher and --sample 0.5 unless --variants says otherwise) on the same model and data. Prints wall time, peak resident memory and
the ratio, ending with `influence/sft_epoch = R` for the largest size. SPEC.md target: R <= 0.5.

The SFT epoch is `ideal.backends.train.train_model` (AdamW, batch 8, warmup + cosine, clipping), the trainer the
loop uses; its mean throughput in tokens/s (padding included) is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # name: (hidden, layers, heads, intermediate)
    "tiny": (32, 2, 4, 128),
    "cpu": (384, 6, 6, 1024),
}


def make_data(root: Path, examples: int, seed: int = 0) -> None:
    """Three toy domains and two reference sets (addition, reversal, sorting), as JSONL."""
    rng = random.Random(seed)

    def row(kind: str) -> dict:
        if kind == "add":
            a, b = rng.randrange(10**5), rng.randrange(10**5)
            return {"prompt": f"add {a} and {b}", "completion": str(a + b)}
        word = "".join(rng.choice("abcdefghij") for _ in range(rng.randrange(8, 24)))
        if kind == "reverse":
            return {"prompt": f"reverse {word}", "completion": word[::-1]}
        return {"prompt": f"sort {word}", "completion": "".join(sorted(word))}

    for split, n in (("train", examples), ("reference", 16)):
        for kind in ("add", "reverse", "sort"):
            path = root / split / kind
            path.mkdir(parents=True, exist_ok=True)
            rows = [json.dumps(row(kind)) for _ in range(n)]
            (path / "data.jsonl").write_text("\n".join(rows) + "\n")


def make_model(path: Path, size: str) -> int:
    from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm

    hidden, layers, heads, intermediate = SIZES[size]
    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", len(tokenizer), hidden, layers, heads, intermediate, seed=0)
    save_model_dir(path, model, tokenizer)
    return sum(p.numel() for p in model.parameters())


def stage_sft(model_dir: Path, train: Path) -> dict:
    from ideal.backends.train import TrainSettings, train_model
    from ideal.data.mixture_io import load_training_set
    from ideal.data.rows import tokenize_examples
    from ideal.hf import load_causal_lm, load_tokenizer

    start = time.perf_counter()
    model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
    training = load_training_set(train)
    items = [
        i for d in training.pool for i in tokenize_examples(training.examples(d), tokenizer)[0]
    ]
    setup = time.perf_counter() - start
    settings = TrainSettings(epochs=1, lr=1e-4, batch_size=8, checkpoint_every=0)
    result = train_model(model, items, settings, tokenizer.pad_token_id)
    tokens_per_s = sum(r["tokens_per_s"] for r in result.log) / len(result.log)
    return {
        "seconds": result.seconds,
        "setup_seconds": setup,
        "examples": len(items),
        "tokens_per_s": tokens_per_s,
    }


def stage_influence(
    model_dir: Path, train: Path, reference: Path, fisher: str, sample: float
) -> dict:
    from ideal.influence.command import compute_influence
    from ideal.influence.engine import InfluenceSettings

    start = time.perf_counter()
    _, doc = compute_influence(
        model_dir, train, reference, InfluenceSettings(fisher=fisher), sample=sample
    )
    total = time.perf_counter() - start
    seconds = doc["seconds"]
    return {
        "seconds": total - seconds["load_and_tokenize"],
        "setup_seconds": seconds["load_and_tokenize"],
        "stages": seconds,
    }


def run_stage(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(
        [sys.executable, __file__, *args, "--threads", str(threads)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="tiny,cpu")
    parser.add_argument("--examples", type=int, default=200, help="training examples per domain")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--variants",
        default="sampled:0.5",
        help="influence settings FISHER:SAMPLE, comma-separated; the first is the one the ratio line reports",
    )
    parser.add_argument("--stage", choices=["sft", "influence"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.stage:
        if args.stage == "sft":
            result = stage_sft(args.model, args.data / "train")
        else:
            fisher, sample = args.variants.split(",")[0].split(":")
            result = stage_influence(
                args.model, args.data / "train", args.data / "reference", fisher, float(sample)
            )
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.examples} examples x 3 domains"
    )
    ratio = None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_data(data, args.examples)
        for size in args.sizes.split(","):
            model_dir = Path(tmp) / size
            params = make_model(model_dir, size)
            common = ["--model", str(model_dir), "--data", str(data)]
            sft = run_stage(["--stage", "sft", *common], args.threads)
            print(f"\n[{size}] {params / 1e6:.2f}M parameters, {sft['examples']} training examples")
            print(
                f"  SFT epoch                 {sft['seconds']:8.2f} s   peak RSS {sft['peak_rss_mib']:7.0f} MiB"
                f"   {sft['tokens_per_s']:.0f} tokens/s"
            )
            for k, variant in enumerate(args.variants.split(",")):
                influence = run_stage(
                    ["--stage", "influence", "--variants", variant, *common], args.threads
                )
                variant_ratio = influence["seconds"] / sft["seconds"]
                ratio = variant_ratio if k == 0 else ratio
                label = f"influence {variant}"
                print(
                    f"  {label:<25} {influence['seconds']:8.2f} s   peak RSS {influence['peak_rss_mib']:7.0f} MiB   ratio {variant_ratio:.3f}"
                )
                stages = {
                    k: round(v, 2)
                    for k, v in influence["stages"].items()
                    if k not in ("load_and_tokenize", "total")
                }
                print(f"    stages {stages}")
    print(f"\ninfluence/sft_epoch = {ratio:.3f}")


if __name__ == "__main__":
    main()
