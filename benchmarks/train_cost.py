"""What logits only at target positions save: a LoRA training step and an evaluation loss pass, each
with the LM head at every position (before) and at the target positions only (now), in one run, on
the same random batch.

    python benchmarks/train_cost.py [--model DIR] [--threads 1] [--batch 8] [--length 224]
                                    [--layers 2] [--repeats 3] [--top-layers K] [--clock cpu]
                                    [--profile]

The batch: --batch rows of --length random token ids, the last 44 % of each row targets (the rest a
prompt, no padding), as in the real preset's measurement. The training step is the builtin trainer's
(`ideal.backends.training.builtin.micro_batch_loss` + backward) on a LoRA adapter with the default recipe
(all-linear, r 8); the evaluation pass is `ideal.backends.evaluation.evaluate.mean_losses`. Each is timed
--repeats times, the two ways interleaved (so that a load change on the machine hits both), after
one untimed warm-up each; the median is printed, and the loss both ways (equal up to round-off).

Without --model, a Llama is built in-process with SmolLM2-135M's widths (vocab 49,152, hidden 576,
9 heads of which 3 key/value, MLP 1,536, tied embeddings) and --layers blocks (SmolLM2 has 30).
With 2 blocks the head is most of the forward, so the speedup is larger than on the real model,
whose head is about a fifth of it; `--layers 30` is the real shape with random weights.

The last line is `speedup = X`: the training step's time with full logits over target-only.

With --top-layers, `--profile` then profiles one all-block step (full logits) and one top-K step:
where their CPU seconds go (matrix products, attention, the rest) and the minor page faults of a
step (each fresh tensor larger than glibc's mmap threshold is faulted in page by page, every
step), and bounds the speedup: the all-block step over the top-K step's products and attention
alone, what the ratio would be if the top-K step spent nothing else.

`--clock cpu` times each run by this process's CPU seconds (user + system, every thread) instead
of the wall clock: on a machine that other jobs share, a run's wall time grows with their load
while its CPU time does not (with --threads 1 the two agree on an idle machine).

With --top-layers K it measures instead, on the same batch, LoRA on every block (today's recipe:
full logits, as the cost was first measured, and target logits, the builtin trainer's default)
against LoRA on the top K blocks from cached features with target-only logits
(ideal.backends.training.top_layers); it prints the cache fill time per row, the evaluation's cost (a loss
pass plus a `choice` likelihood pass over the batch) before (whole model, full logits) and after
(cached bottom, target logits), and the peak memory (max RSS); the last line is `speedup = X`:
the all-block step (full logits) over the top-K step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

TARGET_SHARE = 0.44  # of each row's tokens: the answer, after a prompt


def smollm2_like(layers: int) -> torch.nn.Module:
    """A random Llama with SmolLM2-135M's widths and `layers` blocks (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def random_items(vocab: int, batch: int, length: int, seed: int = 0) -> list:
    from ideal.data.rows import IGNORE_INDEX, Tokenized

    generator = torch.Generator().manual_seed(seed)
    prompt = length - round(TARGET_SHARE * length)
    items = []
    for row in range(batch):
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        items.append(Tokenized(ids, [IGNORE_INDEX] * prompt + ids[prompt:], f"random:{row}"))
    return items


#: what `timed` reads: the wall clock, or this process's CPU time (--clock cpu)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(run: Callable[[], float]) -> tuple[float, float]:
    """(seconds by `clock`, the loss it returned)."""
    start = clock()
    loss = run()
    return clock() - start, loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local causal LM directory (default: built in-process)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--length", type=int, default=224, help="tokens per row")
    parser.add_argument("--layers", type=int, default=2, help="blocks of the built-in model")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each")
    parser.add_argument("--top-layers", type=int, default=0,
                        help="compare all-block LoRA with top-K LoRA from cached features")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="with --top-layers: where a step's CPU time goes, and the bound")  # fmt: skip
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="time runs by the wall clock or by this process's CPU seconds")  # fmt: skip
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]

    from ideal.backends.evaluation.evaluate import mean_losses
    from ideal.backends.training.builtin import (
        TrainSettings,
        micro_batch_loss,
        step_loss_normaliser,
        wrap_lora,
    )
    from ideal.hf import load_causal_lm

    torch.set_num_threads(args.threads)
    if args.model:
        model = load_causal_lm(Path(args.model), dtype=torch.float32)
        name = args.model
    else:
        model = smollm2_like(args.layers)
        name = f"in-process Llama, SmolLM2-135M widths, {args.layers} blocks"
    vocab = model.get_output_embeddings().weight.shape[0]
    hidden = model.get_output_embeddings().weight.shape[1]
    items = random_items(vocab, args.batch, args.length)
    targets = sum(item.num_targets for item in items)
    tokens = args.batch * args.length
    print(f"model: {name}; head {vocab} x {hidden}; {args.threads} thread(s); {args.clock} clock")
    print(f"batch: {args.batch} x {args.length} tokens, {targets} targets ({targets / tokens:.0%})")
    gib = 4 * vocab / 2**30  # float32 logits per row of the head
    print(f"logits: {tokens * gib:.2f} GiB at every position, {targets * gib:.2f} GiB at targets")

    if args.top_layers:
        return top_layers_cost(model, items, args)
    settings = TrainSettings(lora=True)
    model = wrap_lora(model, settings)
    normaliser = step_loss_normaliser(items, settings)

    def train_step(full: bool) -> Callable[[], float]:
        def run() -> float:
            model.zero_grad(set_to_none=True)
            loss, _ = micro_batch_loss(model, items, 0, normaliser, settings, full_logits=full)
            loss.backward()
            return float(loss.detach())

        return run

    def eval_pass(full: bool) -> Callable[[], float]:
        return lambda: float(mean_losses(model, items, 0, args.batch, full_logits=full).mean())

    results = {}
    for label, make, train in (("train step", train_step, True), ("eval loss", eval_pass, False)):
        model.train(train)
        runs = {full: [timed(make(full))] for full in (True, False)}  # warm-up, not counted
        for _ in range(args.repeats):
            for full in (True, False):
                runs[full].append(timed(make(full)))
        for full in (True, False):
            seconds = statistics.median(s for s, _ in runs[full][1:])
            results[label, full] = seconds
            how = "full logits  " if full else "target logits"
            print(f"{label:10s} {how}: {seconds:7.3f} s  (loss {runs[full][-1][1]:.6f})")
        print(f"{label:10s} ratio        : {results[label, True] / results[label, False]:.2f}x")
    print(f"speedup = {results['train step', True] / results['train step', False]:.2f}")
    return 0


def top_layers_cost(base: torch.nn.Module, items: list, args: argparse.Namespace) -> int:
    """All-block LoRA steps against a top-K LoRA step from cached features (module docstring)."""
    import copy
    import resource

    from ideal.backends.training.builtin import (
        TrainSettings,
        micro_batch_loss,
        step_loss_normaliser,
        wrap_lora,
    )
    from ideal.backends.training.top_layers import FeatureCache

    k = args.top_layers
    every = TrainSettings(lora=True)
    top = TrainSettings(lora=True, top_layers=k)
    normaliser = step_loss_normaliser(items, every)
    cache = FeatureCache(None, base, k, None)  # in memory: the fill is what is timed
    fill_seconds = cache.fill(base, items, 0, args.batch)
    print(f"cache fill: {fill_seconds:.3f} s for {len(items)} rows, "
          f"{fill_seconds / len(items):.3f} s per row")  # fmt: skip
    models = {"all": wrap_lora(copy.deepcopy(base), every), "top": wrap_lora(base, top)}

    def step(name: str, full: bool) -> Callable[[], float]:
        model = models[name]
        settings, features = (every, None) if name == "all" else (top, cache)

        def run() -> float:
            model.zero_grad(set_to_none=True)
            loss, _ = micro_batch_loss(
                model, items, 0, normaliser, settings, full_logits=full, features=features
            )
            loss.backward()
            return float(loss.detach())

        return run

    labels = {
        ("all", True): "all blocks, full logits  ",
        ("all", False): "all blocks, target logits",
        ("top", False): f"top {k}, cached, target   ",
    }
    for model in models.values():
        model.train()
    runs = {key: [timed(step(*key))] for key in labels}  # warm-up, not counted
    for _ in range(args.repeats):
        for key in labels:
            runs[key].append(timed(step(*key)))
    seconds = {key: statistics.median(s for s, _ in runs[key][1:]) for key in labels}
    for key, label in labels.items():
        print(f"train step {label}: {seconds[key]:7.3f} s  (loss {runs[key][-1][1]:.6f})")
    fast = seconds["top", False]
    print(f"top {k} vs all blocks with target logits: {seconds['all', False] / fast:.2f}x")
    evaluation = eval_cost(models["top"], items, cache, args)
    print(f"evaluation (losses + choice likelihoods): before {evaluation[False]:.3f} s, "
          f"after {evaluation[True]:.3f} s: {evaluation[False] / evaluation[True]:.2f}x")  # fmt: skip
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"peak memory (max RSS): {peak:.2f} GiB")
    if args.profile:
        for model in models.values():
            model.train()
        parts = {key: profiled(step(*key)) for key in (("all", True), ("top", False))}
        for key, part in parts.items():
            print(f"profile {labels[key]}: {part['cpu']:.3f} CPU s: products {part['mm']:.3f}, "
                  f"attention {part['attention']:.3f}, the rest {part['rest']:.3f}; "
                  f"{part['faults']} page faults")  # fmt: skip
        floor = parts["top", False]["mm"] + parts["top", False]["attention"]
        bound = parts["all", True]["cpu"] / floor
        print(f"bound: all blocks over top {k}'s products and attention alone = {bound:.2f}x")
    print(f"speedup = {seconds['all', True] / fast:.2f}")
    return 0


def profiled(run: Callable[[], float]) -> dict[str, float]:
    """One run under torch's profiler: its CPU seconds, their self time in matrix products, in
    attention and in everything else, and the minor page faults it took."""
    import resource

    from torch.profiler import ProfilerActivity, profile

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.process_time()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    cpu = time.process_time() - start
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    self_s = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    mm = sum(v for key, v in self_s.items() if key in ("aten::mm", "aten::bmm", "aten::addmm"))
    attention = sum(v for key, v in self_s.items() if "scaled_dot_product" in key)
    rest = sum(self_s.values()) - mm - attention
    return {"cpu": cpu, "mm": mm, "attention": attention, "rest": rest, "faults": faults}


def eval_cost(model: torch.nn.Module, items: list, cache, args: argparse.Namespace) -> dict:
    """Seconds of an evaluation's loss pass plus a `choice` likelihood pass over the batch: before
    (the whole model, logits at every position) and after (the cached bottom, target logits);
    interleaved, medians of --repeats after a warm-up. {cached: seconds}"""
    from ideal.backends.evaluation.evaluate import mean_losses
    from ideal.backends.evaluation.scorers import sequence_logprobs

    model.eval()

    def run(cached: bool) -> Callable[[], float]:
        features = cache if cached else None

        def both() -> float:
            losses = mean_losses(model, items, 0, args.batch, not cached, features=features)
            sequence_logprobs(model, items, 0, args.batch, not cached, features=features)
            return float(losses.mean())

        return both

    runs = {cached: [timed(run(cached))] for cached in (False, True)}
    for _ in range(args.repeats):
        for cached in (False, True):
            runs[cached].append(timed(run(cached)))
    for cached in (False, True):
        loss = runs[cached][-1][1]
        print(f"eval {'after ' if cached else 'before'}: mean loss {loss:.6f}")
    return {c: statistics.median(s for s, _ in runs[c][1:]) for c in runs}


if __name__ == "__main__":
    sys.exit(main())
