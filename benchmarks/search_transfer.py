"""Does a mixture searched cheap transfer to the full recipe? The search recipe's measurements.

    python benchmarks/search_transfer.py [--suites demo,conflict,skewed,noisy] [--seeds 5]
        [--proxies fraction-0.25,fraction-0.5,steps-0.25,small-model] [--out runs/transfer]
        [--threads 1] [--analyse-only] [key=value ...]
    python benchmarks/search_transfer.py --config src/ideal/configs/real.yaml --seeds 3 \\
        --proxies top4-lora-quarter --out runs/transfer-real
    python benchmarks/search_transfer.py --rank [--suites demo] [--seeds 3] \\
        [--proxies fraction-0.25,...] [--grid-resolution 7] [--out runs/transfer-rank]

Transfer (default): for every suite (or `--config`), `ideal compare` runs original, uniform and
ideal (the full recipe every round) once, then ideal-search once per proxy; the baselines' run
directories are shared by symlink, so each proxy's compare.json pairs against the same runs
(resumable: an interrupted measurement continues). Prints, per suite and proxy: the whole run's
cost in full-recipe SFTs, the final model's mean test accuracy against D0, uniform and their
per-seed max, and the transfer against ideal, with the three goals (cost <= 1.5 SFTs;
at least max(D0, uniform) within one paired standard error; within one paired standard error of
ideal, or better).

Proxies (the `search:` section each one runs with):

    fraction-0.25       a quarter of each round's volumes (steps scale with it)
    fraction-0.5        half of them
    steps-0.25          the whole mixture, a quarter of the full recipe's steps
    small-model         the suite's architecture at half width (same character tokenizer), built
                        here once (seed 0) into OUT/<suite>/small-model
    top4-lora-quarter   the real preset's proxy: a quarter of the data, LoRA on the top 4 blocks
                        from cached features (train.top_layers)

--rank (Olmix's check; the suites or --config, e.g. the real preset): every mixture of a grid
(D0, uniform, and the lattice of compare's oracle-grid) is trained once per seed with the full
recipe and with each proxy's, the way the loop trains them: a run whose round 0 is D0 and whose
round 1 is the mixture at D0's total (resampled as any update), a proxy's run under its `search:`
recipe (a fraction proxy on the nested fraction of each round) without the final training. The
Spearman rank correlation over mixtures of the mean reference loss (mean over the seeds done) is
printed after each seed, with the full recipe's loss of each proxy's lowest mixture and, from two
seeds on, the full recipe's own noise (one seed of a recipe against the mean of the full recipe's
other seeds: a proxy as good as a full seed ranks as well as one full training does);
OUT/<name>/rank.json holds every loss (resumable):

    python benchmarks/search_transfer.py --rank --config src/ideal/configs/real.yaml --seeds 3 \\
        --proxies top4-lora-quarter --out runs/rank-real --features FEATURES \\
        model=real-data/model train_data=real-data/train reference_data=real-data/reference \\
        test_data=real-data/test
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from ideal.errors import IdealError
from ideal.run.cells import candidate_config, config_d0, oracle_candidates, share_round_zero
from ideal.run.compare import method_config, run_compare
from ideal.run.config import RunConfig, load_config
from ideal.run.loop import run_loop
from ideal.run.rundir import prepare_run
from ideal.run.search import SearchSettings

HERE = Path(__file__).parent
BASELINES = ("original", "uniform", "ideal")


def suite_config(name: str) -> Path:
    if name == "demo":
        return Path(str(files("ideal") / "configs" / "demo.yaml"))
    return HERE / "suites" / f"{name}.yaml"


def proxy_search(name: str, config: RunConfig, out: Path) -> SearchSettings:
    """The search recipe a proxy's name stands for, on this config."""
    steps = config.train.max_steps
    if name.startswith("fraction-"):
        return SearchSettings(fraction=float(name.removeprefix("fraction-")))
    if name.startswith("steps-"):
        share = float(name.removeprefix("steps-"))
        if steps is not None:
            return SearchSettings(
                fraction=1.0, train={"max_steps": max(1, math.ceil(share * steps))}
            )
        return SearchSettings(fraction=1.0, train={"epochs": share * config.train.epochs})
    if name == "small-model":
        return SearchSettings(fraction=1.0, model=str(small_model(config, out / "small-model")))
    if name == "top4-lora-quarter":
        return SearchSettings(fraction=0.25, train={"top_layers": 4, "lora": True})
    raise IdealError(f"--proxies: unknown proxy {name!r}")


def half_width(config: RunConfig) -> dict[str, int]:
    suite = config.suite
    if suite is None:
        raise IdealError("small-model: only the embedded suites build their own smaller model")
    return {
        "hidden_size": suite.hidden_size // 2,
        "intermediate_size": suite.intermediate_size // 2,
    }


def small_model(config: RunConfig, where: Path) -> Path:
    """The suite's model at half width, with the suite's tokenizer (built once, seed 0)."""
    from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm

    if not (where / "config.json").is_file():
        tokenizer = char_tokenizer()
        assert config.suite is not None
        model = tiny_causal_lm("llama", vocab_size=len(tokenizer), num_layers=config.suite.num_layers,
                               num_heads=config.suite.num_heads, seed=0, **half_width(config))  # fmt: skip
        save_model_dir(where, model, tokenizer)
    return where


def measure(config: RunConfig, proxies: list[str], seeds: list[int], out: Path) -> None:
    """The baselines once, then ideal-search per proxy into OUT/<proxy>/ (baselines linked)."""
    run_compare(config, list(BASELINES), seeds, out / "full")
    for proxy in proxies:
        here = out / proxy
        here.mkdir(parents=True, exist_ok=True)
        for method in BASELINES:
            link = here / method
            if not link.exists():
                link.symlink_to(Path("..") / "full" / method, target_is_directory=True)
        searched = replace(config, search=proxy_search(proxy, config, out))
        run_compare(searched, [*BASELINES, "ideal-search"], seeds, here)


def paired(diffs: list[float]) -> tuple[float, float | None]:
    mean = float(np.mean(diffs))
    return mean, float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else None


def shown(mean: float, stderr: float | None) -> str:
    return f"{mean:+.3f}" + ("" if stderr is None else f" +- {stderr:.3f}")


def analyse(name: str, out: Path, proxies: list[str]) -> None:
    print(f"\n## {name}\n")
    print("| proxy | cost in SFTs | ideal's cost | final mean acc | vs max(D0, uniform) | "
          "vs ideal (transfer) | share distance | goals: cost, >= max, ~ ideal |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for proxy in proxies:
        path = out / proxy / "compare.json"
        if not path.is_file():
            print(f"| {proxy} | (not run) | | | | | | |")
            continue
        document = json.loads(path.read_text())
        methods = document["methods"]
        by_seed = {
            m: {r["seed"]: r["selected"]["test_accuracy_mean"] for r in methods[m]["runs"]}
            for m in ("original", "uniform", "ideal-search")
        }
        seeds = sorted(set.intersection(*(set(v) for v in by_seed.values())))
        best = [max(by_seed["original"][s], by_seed["uniform"][s]) for s in seeds]
        above = paired([by_seed["ideal-search"][s] - b for s, b in zip(seeds, best, strict=True)])
        transfer = document["transfer"]
        accuracy = transfer["test_accuracy_mean"]
        cost, full = methods["ideal-search"]["cost_in_sfts"], methods["ideal"]["cost_in_sfts"]
        final = methods["ideal-search"]["test_accuracy_mean"]
        distance = np.mean([s["share_distance"] for s in transfer["per_seed"]])
        goals = (
            "yes" if cost["mean"] <= 1.5 else "no",
            "yes" if above[0] >= -(above[1] or 0.0) else "no",
            {True: "yes", False: "no", None: "n/a"}[transfer["within_one_stderr_or_better"]],
        )
        print(
            f"| {proxy} | {cost['mean']:.2f} +- {cost['std']:.2f} | {full['mean']:.2f} "
            f"| {final['mean']:.3f} +- {final['std']:.3f} | {shown(*above)} "
            f"| {shown(accuracy['mean'], accuracy['stderr'])} ({accuracy['verdict']}) "
            f"| {distance:.3f} | {', '.join(goals)} |"
        )


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rho (ranks with ties averaged), from the Pearson correlation of the ranks."""

    def ranks(x: list[float]) -> np.ndarray:
        values = np.asarray(x, dtype=float)
        order = values.argsort(kind="stable")
        out = np.empty(len(values))
        out[order] = np.arange(len(values), dtype=float)
        for v in np.unique(values):  # ties share their mean rank
            out[values == v] = out[values == v].mean()
        return out

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def grid_mixtures(config: RunConfig, resolution: int | None) -> dict[str, dict[str, float]]:
    """Uniform and the lattice k_i / G at D0's total, as shares (compare's oracle-grid: D0's own
    shares left out, D0 being round 0 of every run)."""
    points = oracle_candidates(config, config_d0(config), resolution)
    return {f"mixture-{k}": shares for k, shares in enumerate(points, 1)}


def mixture_losses(
    config: RunConfig, recipe: str, mixtures: dict[str, dict[str, float]], seed: int, out: Path,
    features: Path,
) -> dict[str, float]:  # fmt: skip
    """One seed of one recipe: D0 and every mixture trained, each a run of round 0 (D0, shared
    by the seed's runs) and round 1 at the mixture's shares; a proxy's runs train with its
    `search:` recipe (its fraction a nested subset of each round) and stop before the final
    training. The mean reference loss of each."""
    base = method_config(config, "random", seed)  # rounds 1, rule fixed; the seed everywhere
    if recipe != "full":
        base = replace(base, search=proxy_search(recipe, config, out.parent.parent))
    losses: dict[str, float] = {}
    first: Path | None = None
    for name, shares in mixtures.items():
        run = out / name
        candidate = candidate_config(base, shares)
        if first is not None:
            prepare_run(candidate, run, resume=True, features=features)
            share_round_zero(first, run)
        summary = run_loop(candidate, run, resume=True, features=features, score_returned=False,
                           final=False).to_json()  # fmt: skip
        losses.setdefault("D0", summary["rounds"][0]["reference_loss_mean"])
        losses[name] = summary["rounds"][1]["reference_loss_mean"]
        first = first or run
    return losses


def rank(
    config: RunConfig, proxies: list[str], seeds: list[int], out: Path, resolution: int | None,
    features: Path | None,
) -> None:  # fmt: skip
    """Olmix's check, seed by seed (every recipe of a seed before the next seed): rank.json is
    rewritten after each, so a stopped measurement keeps what it finished."""
    mixtures = grid_mixtures(config, resolution)
    recipes = ["full", *proxies]
    losses: dict[str, dict[str, list[float]]] = {r: {} for r in recipes}
    for seed in seeds:
        for recipe in recipes:
            here = out / recipe / f"seed-{seed}"
            for name, value in mixture_losses(config, recipe, mixtures, seed, here,
                                              features or out / "features").items():  # fmt: skip
                losses[recipe].setdefault(name, []).append(value)
        (out / "rank.json").write_text(json.dumps(
            {"mixtures": mixtures, "seeds": seeds[: seeds.index(seed) + 1],
             "reference_loss_mean": losses}, indent=1))  # fmt: skip
        print_rank(losses, proxies, mixtures)


def print_rank(
    losses: dict[str, dict[str, list[float]]], proxies: list[str], mixtures: dict[str, dict]
) -> None:
    """Spearman of the mean reference loss over the seeds, proxy against full, and seed by seed;
    and what picking by the proxy costs: the full recipe's loss of the proxy's lowest mixture
    against the full recipe's own lowest, uniform's and D0's (one training each, so
    the full recipe's lowest is biased low)."""
    names = list(losses["full"])
    seeds = len(losses["full"][names[0]])
    full = {m: float(np.mean(losses["full"][m])) for m in names}
    print(f"\nSpearman of the mean reference loss over {len(names)} mixtures (D0 among them) "
          f"x {seeds} seed(s), proxy against the full recipe:")  # fmt: skip
    best = min(names, key=full.get)
    for proxy in proxies:
        ours = {m: float(np.mean(losses[proxy][m])) for m in names}
        per_seed = [
            spearman([losses[proxy][m][k] for m in names], [losses["full"][m][k] for m in names])
            for k in range(seeds)
        ]
        pick = min(names, key=ours.get)
        print(f"  {proxy:<20} rho = {spearman(list(ours.values()), list(full.values())):+.2f} "
              f"(per seed {' '.join(f'{r:+.2f}' for r in per_seed)}); its lowest {pick}: "
              f"full-recipe loss {full[pick]:.4f}")  # fmt: skip
    uniform = next(m for m, p in mixtures.items() if max(p.values()) - min(p.values()) < 1e-9)
    print(
        f"  full recipe: lowest {best} {full[best]:.4f} {mixtures.get(best, 'D0')}; "
        f"uniform {full[uniform]:.4f}; D0 {full['D0']:.4f}"
    )
    if seeds < 2:
        return
    # the full recipe's own noise: one seed of a recipe against the mean of the full recipe's
    # other seeds; a proxy that does as well as a full seed ranks as well as one full training
    print("Leave one seed out, seed k of a recipe against the full recipe's mean over the others:")
    rests = [
        [np.mean([v for j, v in enumerate(losses["full"][m]) if j != k]) for m in names]
        for k in range(seeds)
    ]
    for recipe in ["full", *proxies]:
        rhos = [spearman([losses[recipe][m][k] for m in names], rests[k]) for k in range(seeds)]
        print(f"  {recipe:<20} {' '.join(f'{r:+.2f}' for r in rhos)} (mean {np.mean(rhos):+.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suites", default="demo,conflict,skewed,noisy")
    parser.add_argument("--config", type=Path, help="a run config instead of the suites")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--only-seeds",
        help="comma-separated seeds to run of range(--seeds), e.g. 2 (one worker's "
        "share: a second process on another core; run without it last to pool every seed)",
    )
    parser.add_argument("--proxies", default="fraction-0.25,fraction-0.5,steps-0.25,small-model")
    parser.add_argument("--out", type=Path, default=Path("runs/transfer"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--analyse-only", action="store_true", help="only read finished runs")
    parser.add_argument("--rank", action="store_true", help="Spearman over a grid of mixtures")
    parser.add_argument(
        "--grid-resolution", type=int, help="--rank: shares k / G (default domains + 2)"
    )
    parser.add_argument(
        "--features", type=Path, help="--rank: a feature cache to share (train.top_layers)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds, proxies = list(range(args.seeds)), args.proxies.split(",")
    if args.only_seeds:
        seeds = [s for s in seeds if str(s) in args.only_seeds.split(",")]
    named = (
        {"config": args.config}
        if args.config
        else {n: suite_config(n) for n in args.suites.split(",")}
    )
    for name, path in named.items():
        out = args.out / name
        config = load_config(path, [f"train.threads={args.threads}", *args.overrides])
        if args.rank:
            rank(config, proxies, seeds, out, args.grid_resolution, args.features)
            continue
        if not args.analyse_only:
            measure(config, proxies, seeds, out)
        analyse(name, out, proxies)


if __name__ == "__main__":
    main()
