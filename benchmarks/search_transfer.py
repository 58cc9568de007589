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

--rank (Olmix's check, suites only): every mixture of a grid (D0, uniform, and the lattice of
compare's oracle-grid) is trained once per seed with the full recipe and with each proxy's
(round 0 alone: a fraction proxy at the fraction of the mixture's volumes and steps, the
small-model proxy as the suite at half width with the seed's own initialisation), and the
Spearman rank correlation over mixtures of the mean reference loss (mean over seeds) is printed.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ideal.errors import IdealError
from ideal.run.cells import grid_shares
from ideal.run.compare import run_compare
from ideal.run.config import RunConfig, load_config
from ideal.run.loop import run_loop
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


def grid_volumes(config: RunConfig, resolution: int | None) -> dict[str, dict[str, int]]:
    """D0, uniform and the lattice k_i / G at D0's total (largest remainders)."""
    assert config.suite is not None
    d0 = {d.name: d.volume for d in config.suite.domains}
    domains, total = sorted(d0), sum(d0.values())
    mixtures = {"D0": d0}
    points = [
        {d: 1 / len(domains) for d in domains},
        *grid_shares(domains, resolution or len(domains) + 2),
    ]
    for k, shares in enumerate(points):
        raw = {d: shares[d] * total for d in domains}
        volumes = {d: int(np.floor(v)) for d, v in raw.items()}
        for d in sorted(domains, key=lambda d: volumes[d] - raw[d])[
            : total - sum(volumes.values())
        ]:
            volumes[d] += 1
        mixtures["uniform" if k == 0 else f"grid-{k}"] = volumes
    return mixtures


def round_zero(
    config: RunConfig, volumes: dict[str, int], seed: int, where: Path
) -> dict[str, Any]:
    """Round 0 of one (recipe, mixture, seed): its metrics.json."""
    assert config.suite is not None
    domains = tuple(replace(d, volume=max(1, volumes[d.name])) for d in config.suite.domains)
    config = replace(config, suite=replace(config.suite, seed=seed, domains=domains), rounds=0,
                     seed=seed, train=replace(config.train, seed=seed))  # fmt: skip
    run_loop(config, where, resume=True)
    return json.loads((where / "round-0" / "metrics.json").read_text())


def proxy_recipe(
    config: RunConfig, proxy: str, volumes: dict[str, int]
) -> tuple[RunConfig, dict[str, int]]:
    """A proxy's recipe and volumes for one mixture (round 0 alone, no final training)."""
    search = (
        proxy_search(proxy, config, Path("."))
        if proxy != "small-model"
        else SearchSettings(fraction=1.0)
    )
    recipe = replace(config, search=search).search_config()
    if proxy == "small-model":  # the suite at half width: its own initialisation per seed
        assert recipe.suite is not None
        recipe = replace(recipe, suite=replace(recipe.suite, **half_width(config)))
    scaled = {d: max(1, math.floor(search.fraction * v + 0.5)) for d, v in volumes.items()}
    return recipe, scaled


def rank(
    config: RunConfig, proxies: list[str], seeds: list[int], out: Path, resolution: int | None
) -> None:
    mixtures = grid_volumes(config, resolution)
    losses: dict[str, dict[str, list[float]]] = {"full": {}, **{p: {} for p in proxies}}
    for name, volumes in mixtures.items():
        for recipe_name in losses:
            recipe, scaled = (
                (config, volumes)
                if recipe_name == "full"
                else proxy_recipe(config, recipe_name, volumes)
            )
            losses[recipe_name][name] = [
                round_zero(recipe, scaled, seed, out / recipe_name / name / f"seed-{seed}")[
                    "reference_loss_mean"
                ]
                for seed in seeds
            ]
    full = [float(np.mean(losses["full"][m])) for m in mixtures]
    print(f"\nSpearman of the mean reference loss over {len(mixtures)} mixtures x {len(seeds)} seeds, "
          "proxy against the full recipe:")  # fmt: skip
    for proxy in proxies:
        ours = [float(np.mean(losses[proxy][m])) for m in mixtures]
        print(f"  {proxy:<20} rho = {spearman(ours, full):+.2f}")
    (out / "rank.json").write_text(
        json.dumps({"mixtures": mixtures, "seeds": seeds, "reference_loss_mean": losses}, indent=1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suites", default="demo,conflict,skewed,noisy")
    parser.add_argument("--config", type=Path, help="a run config instead of the suites")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--proxies", default="fraction-0.25,fraction-0.5,steps-0.25,small-model")
    parser.add_argument("--out", type=Path, default=Path("runs/transfer"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--analyse-only", action="store_true", help="only read finished runs")
    parser.add_argument("--rank", action="store_true", help="Spearman over a grid of mixtures")
    parser.add_argument(
        "--grid-resolution", type=int, help="--rank: shares k / G (default domains + 2)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds, proxies = list(range(args.seeds)), args.proxies.split(",")
    named = (
        {"config": args.config}
        if args.config
        else {n: suite_config(n) for n in args.suites.split(",")}
    )
    for name, path in named.items():
        out = args.out / name
        config = load_config(path, [f"train.threads={args.threads}", *args.overrides])
        if args.rank:
            rank(config, proxies, seeds, out, args.grid_resolution)
            continue
        if not args.analyse_only:
            measure(config, proxies, seeds, out)
        analyse(name, out, proxies)


if __name__ == "__main__":
    main()
