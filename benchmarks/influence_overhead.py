"""Influence step vs one SFT epoch, measured side by side on the same model and mixture.

    python benchmarks/influence_overhead.py [--sizes tiny,cpu] [--examples 200] [--threads 1]
                                            [--scales 1,2,4,8] [--curve]

For each model size, runs in fresh subprocesses (so that peak memory is per stage): one epoch of full
fine-tuning with AdamW over the whole mixture (the trained model is kept), and `ideal influence`
(EK-FAC, default layers and default sample sizes unless --variants says otherwise) on the trained
model and the same data. The largest size is also run with the mixture at each of --scales (x1 = 3
domains x --examples): the SFT epoch grows with the data, the influence step's samples are bounded.
`--curve` adds, at x1, the accuracy-vs-cost curve of the sample sizes against the full computation
(`--sample 1.0 --curvature-examples all --max-examples all`).

The script ends with exactly two lines, `influence/sft_epoch = R` (x1) and
`influence/sft_epoch at xS = R8` (the largest scale), so that a program can read them. SPEC.md
targets: R <= 0.5 and, at x8, R8 <= 0.15.

Beside wall seconds, each stage reports its process CPU seconds and the ratio of those: with one
thread they match wall time on an idle machine and stay a fair measure of cost on a busy one.

The SFT epoch is `ideal.backends.training.builtin.train_model` (AdamW, batch 8, warmup + cosine, clipping), the
trainer the loop uses; its mean throughput in tokens/s (padding included) is printed too.
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


def stage_sft(model_dir: Path, train: Path, save: Path | None = None) -> dict:
    from ideal.backends.training.builtin import TrainSettings, train_model
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
    cpu = time.process_time()
    result = train_model(model, items, settings, tokenizer.pad_token_id)
    cpu = time.process_time() - cpu
    if save is not None:
        result.model.save_pretrained(save, safe_serialization=True)
        tokenizer.save_pretrained(save)
    tokens_per_s = sum(r["tokens_per_s"] for r in result.log) / len(result.log)
    return {
        "seconds": result.seconds,
        "cpu_seconds": cpu,
        "setup_seconds": setup,
        "examples": len(items),
        "tokens_per_s": tokens_per_s,
    }


def stage_influence(model_dir: Path, train: Path, reference: Path, variant: str) -> dict:
    """`variant` is FISHER:SAMPLE[:CURVATURE_EXAMPLES[:MAX_EXAMPLES[:REFINE]]] ('all' for no
    bound; the defaults when left out; REFINE conjugate-gradient steps, default 0)."""
    from ideal.influence.settings import InfluenceConfig, InfluenceJob
    from ideal.influence.step import compute_influence
    from ideal.settings import default_of

    fisher, sample, *bounds = variant.split(":")
    defaults = [str(default_of(InfluenceConfig, k)) for k in ("curvature_examples", "max_examples")]
    curvature, cap = [*bounds, *defaults][:2]
    refine = int(bounds[2]) if len(bounds) > 2 else 0
    start, cpu = time.perf_counter(), time.process_time()
    config = InfluenceConfig(
        fisher=fisher, refine=refine, batch_size=8, sample=float(sample),
        curvature_examples=None if curvature == "all" else int(curvature),
        max_examples=None if cap == "all" else int(cap),
    )  # fmt: skip
    _, doc = compute_influence(model_dir, train, reference, InfluenceJob(config))
    total, cpu = time.perf_counter() - start, time.process_time() - cpu
    seconds = doc["seconds"]
    return {
        "seconds": total - seconds["load_and_tokenize"],
        "cpu_seconds": cpu,  # loading and tokenizing included (~1 s here)
        "setup_seconds": seconds["load_and_tokenize"],
        "stages": seconds,
        "scores": doc["scores"],
        "stderr": doc["stderr"],
        "examples": doc["examples"],
        "curvature_examples": doc["curvature_examples"],
        "refine": doc.get("refine"),
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


def scaled_data(root: Path, examples: int, scales: list[int]) -> dict[int, Path]:
    """Data at each scale: the first examples x scale rows of every domain of one generated set."""
    full = root / "full"
    make_data(full, examples * max(scales))
    out = {}
    for scale in scales:
        here = root / f"x{scale}"
        for split in ("train", "reference"):
            for domain in (full / split).iterdir():
                rows = (domain / "data.jsonl").read_text().splitlines()
                keep = rows[: examples * scale] if split == "train" else rows
                (here / split / domain.name).mkdir(parents=True, exist_ok=True)
                (here / split / domain.name / "data.jsonl").write_text("\n".join(keep) + "\n")
        out[scale] = here
    return out


def agreement(scores: list, reference: list) -> tuple[float, float]:
    """Pearson correlation with the reference scores and the largest error relative to the
    reference's largest |score|."""
    import numpy as np

    a, b = np.ravel(scores), np.ravel(reference)
    return float(np.corrcoef(a, b)[0, 1]), float(np.abs(a - b).max() / np.abs(b).max())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="tiny,cpu")
    parser.add_argument("--examples", type=int, default=200, help="training examples per domain")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scales", default="1,2,4,8", help="mixture sizes of the largest model")
    parser.add_argument(
        "--variants",
        default="sampled:0.5",
        help="influence settings FISHER:SAMPLE[:CURVATURE_EXAMPLES[:MAX_EXAMPLES[:REFINE]]], "
        "comma-separated; the first is the one the ratio lines report (refinement: e.g. "
        "sampled:0.5,sampled:0.5:128:64:3,sampled:0.5:128:64:10)",
    )
    parser.add_argument("--curve", action="store_true", help="accuracy vs cost of sample sizes")
    parser.add_argument("--stage", choices=["sft", "influence"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.stage:
        if args.stage == "sft":
            result = stage_sft(args.model, args.data / "train", args.save)
        else:
            result = stage_influence(
                args.model, args.data / "train", args.data / "reference", args.variants
            )
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    scales = [int(x) for x in args.scales.split(",")]
    sizes = args.sizes.split(",")
    variants = args.variants.split(",")
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.examples} examples x 3 domains"
        f" (x{'/'.join(map(str, scales))} for {sizes[-1]})"
    )
    ratios: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = scaled_data(Path(tmp) / "data", args.examples, scales)
        for size in sizes:
            model_dir = Path(tmp) / size
            params = make_model(model_dir, size)
            for scale in scales if size == sizes[-1] else [1]:
                common = ["--data", str(data[scale])]
                trained = Path(tmp) / f"{size}-trained"
                save = ["--save", str(trained)] if scale == 1 else []
                sft = run_stage(["--stage", "sft", "--model", str(model_dir), *common, *save],
                                args.threads)  # fmt: skip
                print(f"\n[{size} x{scale}] {params / 1e6:.2f}M parameters, {sft['examples']} "
                      "training examples")  # fmt: skip
                print(
                    f"  SFT epoch                 {sft['seconds']:8.2f} s   cpu {sft['cpu_seconds']:8.2f} s   peak RSS {sft['peak_rss_mib']:7.0f} MiB"
                    f"   {sft['tokens_per_s']:.0f} tokens/s"
                )
                for k, variant in enumerate(variants):
                    influence = run_stage(["--stage", "influence", "--variants", variant, "--model",
                                           str(trained), *common], args.threads)  # fmt: skip
                    ratio = influence["seconds"] / sft["seconds"]
                    if k == 0 and size == sizes[-1]:
                        ratios[scale] = ratio
                    print(
                        f"  influence {variant:<15} {influence['seconds']:8.2f} s   cpu {influence['cpu_seconds']:8.2f} s   peak RSS {influence['peak_rss_mib']:7.0f} MiB   ratio {ratio:.3f} (cpu {influence['cpu_seconds'] / sft['cpu_seconds']:.3f})"
                    )
                    stages = {
                        k: round(v, 2)
                        for k, v in influence["stages"].items()
                        if k not in ("load_and_tokenize", "total")
                    }
                    print(f"    stages {stages}; copies per domain {influence['examples']}, "
                          f"curvature {influence['curvature_examples']:.0f}")  # fmt: skip
                    if k == 0:
                        first = influence
                    elif (influence.get("refine") or {}).get("iterations"):  # moves vs the first
                        import numpy as np

                        pearson, error = agreement(influence["scores"], first["scores"])
                        final = [r[-1] for g in influence["refine"]["residuals"]
                                 for r in g.values()]  # fmt: skip
                        print(f"    vs {variants[0]}: Pearson {pearson:.4f}, max change / max "
                              f"|score| {error:.3f}; last relative residuals "
                              f"{np.round(final, 4).tolist()}")  # fmt: skip
            if args.curve and size == sizes[-1]:
                common = ["--data", str(data[1]), "--model", str(Path(tmp) / f"{size}-trained")]
                full = run_stage(["--stage", "influence", "--variants", "sampled:1.0:all:all",
                                  *common], args.threads)  # fmt: skip
                print(f"\n[{size} x1] accuracy vs cost, against the full computation "
                      f"({full['seconds']:.2f} s): sample:curvature:max -> seconds, Pearson, "
                      "max error / max |score|, median stderr / max |score|")  # fmt: skip
                import numpy as np

                top = float(np.abs(full["scores"]).max())
                for variant in ("0.5:32:32", "0.5:64:32", "0.5:64:64", "0.5:128:64",
                                "0.5:256:128", "1.0:all:all"):  # fmt: skip
                    run = run_stage(["--stage", "influence", "--variants", f"sampled:{variant}",
                                     *common], args.threads)  # fmt: skip
                    pearson, error = agreement(run["scores"], full["scores"])
                    spread = float(np.median(run["stderr"])) / top
                    print(f"  {variant:<12} {run['seconds']:7.2f} s   {pearson:.4f}   {error:.3f}"
                          f"   {spread:.3f}")  # fmt: skip
    largest = max(scales)
    print(f"\ninfluence/sft_epoch = {ratios[1]:.3f}")
    if largest > 1:
        print(f"influence/sft_epoch at x{largest} = {ratios[largest]:.3f}")


if __name__ == "__main__":
    main()
