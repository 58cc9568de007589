"""What making and reading a feature cache costs on a real model: the frozen bottom's hash (each time
a cache is made), the fill, and reading every row back, in seconds and peak resident memory.

    python benchmarks/feature_cache.py --model real-data/model --train real-data/train \
        [--top-layers 4] [--max-length 256] [--threads 1] [--cache /tmp/ideal-cache-bench]

Three fresh processes, one after the other (a process's peak RSS is its own): `fill` loads the
model, makes the cache (hashing the bottom) and fills it with every training row (the cache
directory is removed first); `read` loads the model, makes the cache again (as the next stage of
a round does: evaluation, influence, the next round's training) and reads every row back in
micro-batches of 8 in a shuffled order, as a training epoch does, then makes a third cache in the
same process; `hash` loads the model and makes the cache once more. Prints one JSON line per
process and a summary: seconds per part, the peak RSS after loading the model and at the end
(MiB; what the cache adds is the difference).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def phase(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from ideal.backends.training.top_layers import FeatureCache
    from ideal.data.mixture_io import load_training_set
    from ideal.data.rows import tokenize_examples
    from ideal.hf import load_causal_lm, load_tokenizer

    began = time.perf_counter()
    model = load_causal_lm(args.model).eval()
    tokenizer = load_tokenizer(args.model)
    training = load_training_set(args.train)
    examples = [e for d in training.mixture.domains for e in training.examples(d)]
    items, _ = tokenize_examples(examples, tokenizer, args.max_length)
    out: dict = {"phase": args.phase, "rows": len(items), "load_s": time.perf_counter() - began}
    out["peak_after_load_mib"] = peak_mib()
    start = time.perf_counter()
    cache = FeatureCache(args.cache, model, args.top_layers, args.max_length)
    out["make_cache_s"] = time.perf_counter() - start
    if args.phase == "fill":
        start = time.perf_counter()
        with torch.no_grad():
            cache.fill(model, items, tokenizer.pad_token_id, 8)
        out["fill_s"] = time.perf_counter() - start
    elif args.phase == "read":
        order = list(range(len(items)))
        random.Random(0).shuffle(order)
        start = time.perf_counter()
        total = 0
        for i in range(0, len(order), 8):
            states = cache.states([items[j] for j in order[i : i + 8]], torch.device("cpu"))
            total += states.shape[0]
        out["read_s"] = time.perf_counter() - start
        assert total == len(items)
        start = time.perf_counter()
        FeatureCache(args.cache, model, args.top_layers, args.max_length)
        out["make_cache_again_s"] = time.perf_counter() - start
    out["peak_mib"] = peak_mib()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--top-layers", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="/tmp/ideal-cache-bench")
    parser.add_argument("--phase", choices=("fill", "read", "hash"), default=None)
    args = parser.parse_args()
    if args.phase is not None:
        print(json.dumps(phase(args)), flush=True)
        return
    shutil.rmtree(args.cache, ignore_errors=True)
    results = {}
    for name in ("fill", "read", "hash"):
        command = [sys.executable, __file__, "--phase", name] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "phase"
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(results[name]), flush=True)
    size = sum(p.stat().st_size for p in Path(args.cache).rglob("*") if p.is_file())
    print(
        f"cache {size / 2**20:.0f} MiB on disk, {results['fill']['rows']} rows; "
        f"hash (make a cache): {results['fill']['make_cache_s']:.2f} s first, "
        f"{results['read']['make_cache_s']:.2f} s in the next process, "
        f"{results['read']['make_cache_again_s']:.3f} s again in it; "
        f"fill {results['fill']['fill_s']:.1f} s; read every row {results['read']['read_s']:.2f} s; "
        f"peak RSS over the model: fill +{results['fill']['peak_mib'] - results['fill']['peak_after_load_mib']:.0f} MiB, "
        f"read +{results['read']['peak_mib'] - results['read']['peak_after_load_mib']:.0f} MiB"
    )


if __name__ == "__main__":
    main()
