"""Where does the IDEAL step act? Every update's outcome, and what `update.rescore` would change.

    python benchmarks/step_activity.py CAMPAIGN_DIR/METHOD [...] [--config CONFIG]

(CONFIG: whose update and influence settings judge the trigger; the suites share them)

Each argument is the directory of one method's runs in an `ideal compare` output (seed-*/ under
it). Per update (RUN/step-K/choice.json) the outcome is one of:

    held     the noise held every sensitivity (update.min_z): no candidate, the run stops
    base     candidates trained, the base round kept (no held-out loss below its)
    step     a candidate step kept

and the largest z = |alpha_i| / se_i of the influence it started from. With `--config`, each
update is also judged by `update.rescore`'s trigger on its influence.json (ideal.run.influence_round
.needs_rescore, under that config with update.rescore on): `rescore` counts the updates it would
score again, so the runs where the setting can change anything. The counts are per argument and
over all; nothing is trained.

    python benchmarks/step_activity.py --replay LEDGER --baseline CAMPAIGN:METHOD \\
        --every CAMPAIGN:METHOD [...]

--replay: `update.rescore` replayed from two measured campaigns on the same seeds, where the
baseline (the default ideal) and `every` (influence.max_examples all on every update) share their
rounds before the first update: a seed whose baseline update was held (it trained fewer models)
takes every copy's cell, the others the baseline's. Prints, per changed seed and pooled over all
the pairs, the difference (rescore - baseline) in mean test accuracy, mean test loss and worst
accuracy, with paired standard errors, and the trainings of each. Pairs are given as
`--baseline noisy-ties:ideal-lowest --every noisy-examples-all:ideal` (one of each per suite).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np


def outcome(choice: dict) -> str:
    if not choice.get("candidates"):
        return "held"
    return "base" if choice.get("kept") is None else "step"


def largest_z(influence: dict) -> float:
    """The largest z = |alpha_i| / se_i of an influence.json (ideal.methods.rules.direction_table;
    z does not depend on the update's settings)."""
    from ideal.methods.rules import direction_table
    from ideal.methods.settings import UpdateSettings

    table = direction_table(influence, UpdateSettings(), list(influence["sensitivity"]))
    return max((row["z"] or 0.0 for row in table.values()), default=0.0)


def activity(directories: list[Path], config_path: Path | None) -> None:
    config = None
    if config_path is not None:
        from ideal.run.config import load_config

        config = load_config(config_path, ["update.rescore=true"])
    print("| runs | updates | held | base | step | largest z per update | rescore would |")
    print("|---|---|---|---|---|---|---|")
    total: Counter = Counter()
    for directory in directories:
        counts: Counter = Counter()
        zs = []
        for choice_file in sorted(directory.glob("seed-*/step-*/choice.json")):
            choice = json.loads(choice_file.read_text())
            run = choice_file.parent.parent
            influence = json.loads(
                (run / f"round-{choice['from_round']}" / "influence.json").read_text()
            )
            counts[outcome(choice)] += 1
            counts["updates"] += 1
            zs.append(largest_z(influence.get("rescored") or influence))
            if config is not None:
                from ideal.run.influence_round import needs_rescore

                counts["rescore"] += needs_rescore(config, influence)
        total += counts
        rescore = str(counts["rescore"]) if config is not None else ""
        print(
            f"| {directory} | {counts['updates']} | {counts['held']} | {counts['base']} "
            f"| {counts['step']} | {' '.join(f'{z:.1f}' for z in zs)} | {rescore} |"
        )
    rescore = str(total["rescore"]) if config is not None else ""
    print(
        f"| all | {total['updates']} | {total['held']} | {total['base']} | {total['step']} | "
        f"| {rescore} |"
    )


def replay(ledger: Path, baselines: list[str], everies: list[str]) -> None:
    rows = [json.loads(line) for line in ledger.read_text().splitlines() if line.strip()]

    def cells(spec: str) -> dict[int, dict]:
        campaign, method = spec.split(":")
        found = [r for r in rows if r["campaign"] == campaign and r["method"] == method]
        return {r["seed"]: r["run"] for r in found}  # the latest line of a seed wins

    diffs: dict[str, list[float]] = {"test_accuracy_mean": [], "test_loss_mean": [],
                                     "test_accuracy_worst": []}  # fmt: skip
    print("| pair | seed | accuracy | test loss | worst | trainings |")
    print("|---|---|---|---|---|---|")
    for base_spec, every_spec in zip(baselines, everies, strict=True):
        base, every = cells(base_spec), cells(every_spec)
        for seed in sorted(set(base) & set(every)):
            # held: the baseline's update trained no candidate where every copy's did (where
            # both were held, the two runs are the same run and either is the answer)
            b = base[seed]
            held = b["trainings"] < every[seed]["trainings"]
            r = every[seed] if held else b
            row = []
            for key in diffs:
                d = r["selected"][key] - b["selected"][key]
                diffs[key].append(d)
                row.append(f"{d:+.4f}")
            if held:
                print(f"| {base_spec} | {seed} | {' | '.join(row)} | "
                      f"{b['trainings']} -> {r['trainings']} |")  # fmt: skip
    n = len(diffs["test_accuracy_mean"])
    shown = []
    for _key, values in diffs.items():
        mean = float(np.mean(values))
        se = float(np.std(values, ddof=1) / np.sqrt(n))
        shown.append(f"{mean:+.4f} +- {se:.4f}")
    print(f"| pooled | {n} pairs | {' | '.join(shown)} | |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("directories", nargs="*", type=Path)
    parser.add_argument("--config", type=Path, help="judge each update by update.rescore's trigger")
    parser.add_argument("--replay", type=Path, help="a ledger: replay update.rescore from it")
    parser.add_argument("--baseline", action="append", default=[])
    parser.add_argument("--every", action="append", default=[])
    args = parser.parse_args()
    if args.replay:
        replay(args.replay, args.baseline, args.every)
    if args.directories:
        activity(args.directories, args.config)


if __name__ == "__main__":
    main()
