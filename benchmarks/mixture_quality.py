"""Does IDEAL beat the simple baselines? Issue 17's diagnosis over suites and seeds.

    python benchmarks/mixture_quality.py [--suites demo,conflict,skewed,noisy] [--seeds 5]
        [--methods ideal,ideal-trust] [--out runs/quality] [--threads 1] [--analyse-only]
        [--plot docs/mixture-quality.png] [key=value ...]

For every suite (the demo's, and those in benchmarks/suites/), runs `ideal compare` with original,
uniform and the iterative methods over the seeds (resumable: an interrupted run continues), then prints, per suite:

- mean +- sd over seeds of the mean and worst test accuracy of D0, uniform, IDEAL after each round,
  and IDEAL under every `select` (which round is returned; chosen on the reference sets only),
  all from the same runs: selection changes no training;
- paired per-seed differences against D0 and uniform (mean +- standard error, verdict at 2 SE) and
  issue 17's acceptance: mean >= max(D0, uniform) within one sd of the difference, worst >= D0's;
- the predicted against the realised change of the mean reference loss per round (does the
  first-order prediction of the update hold?).
"""

from __future__ import annotations

import argparse
import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from ideal.errors import IdealError
from ideal.methods.select import SELECTIONS, select_round
from ideal.paired import VERDICT_Z, verdict
from ideal.run.compare import run_compare
from ideal.run.config import load_config

HERE = Path(__file__).parent
ITERATIVE = (
    "ideal",
    "ideal-trust",
    "ideal-unseen",
    "ideal-unseen-trust",
    "ideal-additive",
    "ideal-unseen-additive",
    "ideal-unseen-additive-trust",
    "ideal-uniform-probe",
    "ideal-no-probe",
)  # every round and selection shown


def suite_config(name: str) -> Path:
    if name == "demo":
        return Path(str(files("ideal") / "configs" / "demo.yaml"))
    return HERE / "suites" / f"{name}.yaml"


def summaries(out: Path, method: str, seeds: list[int]) -> dict[int, dict]:
    found = {}
    for seed in seeds:
        path = out / method / f"seed-{seed}" / "summary.json"
        if path.is_file():
            found[seed] = json.loads(path.read_text())
    return found


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} +- {sd:.3f}"


def paired(ours: dict[int, float], theirs: dict[int, float]) -> tuple[str, float, float | None]:
    seeds = sorted(set(ours) & set(theirs))
    diffs = [ours[s] - theirs[s] for s in seeds]
    if not diffs:
        return "-", float("nan"), None
    mean = float(np.mean(diffs))
    sd = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
    stderr = sd / np.sqrt(len(diffs)) if sd is not None else None
    text = f"{mean:+.3f} +- {stderr:.3f} ({verdict(mean, stderr)})" if stderr else f"{mean:+.3f}"
    return text, mean, sd


def analyse(name: str, out: Path, seeds: list[int]) -> None:
    d0, uniform = (summaries(out, m, seeds) for m in ("original", "uniform"))
    iterative = {m: summaries(out, m, seeds) for m in ITERATIVE}
    iterative = {m: runs for m, runs in iterative.items() if runs}
    if not iterative:
        print(f"\n## {name}: no finished iterative run in {out}")
        return None
    rows: dict[str, dict[int, dict]] = {
        "original (D0)": {s: r["rounds"][0] for s, r in d0.items()},
        "uniform": {s: r["rounds"][-1] for s, r in uniform.items()},
    }
    for method, runs in iterative.items():
        rounds = max(len(r["rounds"]) for r in runs.values()) - 1
        for k in range(1, rounds + 1):
            rows[f"{method}, round {k}"] = {
                s: r["rounds"][k] for s, r in runs.items() if len(r["rounds"]) > k
            }
        for by in SELECTIONS[1:]:
            picked = {}
            for s, r in runs.items():
                try:
                    picked[s] = r["rounds"][select_round(r["rounds"], by)]
                except IdealError:  # e.g. no reference accuracy in an older run
                    continue
            rows[f"{method}, select={by}"] = picked

    def metric(entries: dict[int, dict], key: str) -> dict[int, float]:
        return {s: e[key] for s, e in entries.items() if e.get(key) is not None}

    base_mean = metric(rows["original (D0)"], "test_accuracy_mean")
    base_worst = metric(rows["original (D0)"], "test_accuracy_worst")
    uni_mean = metric(rows["uniform"], "test_accuracy_mean")
    seen = sorted({s for runs in iterative.values() for s in runs})
    print(f"\n## {name} ({len(seen)} seeds: {seen})\n")
    print(
        "| mixture | mean test acc | worst | mean ref. loss | vs D0 (mean) | vs uniform (mean) "
        "| vs D0 (worst) | rounds picked | acceptance |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, entries in rows.items():
        mean, worst = metric(entries, "test_accuracy_mean"), metric(entries, "test_accuracy_worst")
        loss = metric(entries, "reference_loss_mean")
        vs_d0, _, _ = paired(mean, base_mean) if label != "original (D0)" else ("", 0, None)
        vs_uni, _, _ = paired(mean, uni_mean) if label != "uniform" else ("", 0, None)
        vs_worst, _, _ = paired(worst, base_worst) if label != "original (D0)" else ("", 0, None)
        accept = ""
        if label.startswith("ideal"):
            best_baseline = {
                s: max(base_mean[s], uni_mean[s]) for s in mean if s in base_mean and s in uni_mean
            }
            _, gain, sd = paired(mean, best_baseline)
            _, worst_gain, _ = paired(worst, base_worst)
            ok = gain >= -(sd or 0.0) and worst_gain >= 0
            accept = f"{'yes' if ok else 'no'} ({gain:+.3f} vs max, sd {sd or 0:.3f})"
        picked = ",".join(str(e["round"]) for _, e in sorted(entries.items()))
        print(
            f"| {label} | {mean_sd(list(mean.values()))} | {mean_sd(list(worst.values()))} "
            f"| {mean_sd(list(loss.values()))} | {vs_d0} | {vs_uni} | {vs_worst} | {picked} "
            f"| {accept} |"
        )
    for method, runs in iterative.items():
        predicted_vs_realised(method, runs)
    print(f"(verdicts at {VERDICT_Z:g} standard errors of the paired difference)")
    return {label: metric(entries, "test_accuracy_mean") for label, entries in rows.items()}


def predicted_vs_realised(method: str, runs: dict[int, dict]) -> None:
    """Does the first-order prediction of a round's change of the reference loss hold?"""
    pairs = [
        (r["predicted_reference_loss_change"], r["realised_reference_loss_change"])
        for s in runs.values()
        for r in s["rounds"][1:]
        if r.get("predicted_reference_loss_change") is not None
    ]
    if len(pairs) > 2:
        predicted, realised = np.array(pairs).T
        print(
            f"\n{method}: predicted vs realised change of the mean reference loss over "
            f"{len(pairs)} rounds: "
            f"Pearson {np.corrcoef(predicted, realised)[0, 1]:.2f}, realised/predicted median "
            f"{np.median(realised / predicted):.2f}, realised < 0 in "
            f"{int((realised < 0).sum())} of {len(pairs)}"
        )


def plot(tables: dict[str, dict[str, dict[int, float]]], path: Path) -> None:
    """Per suite: each mixture's paired difference of mean test accuracy against the better of D0
    and uniform on the same seed (dots), with its mean +- 2 standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(tables), figsize=(4.2 * len(tables), 4.6), sharey=True, squeeze=False
    )
    for ax, (name, table) in zip(axes[0], tables.items(), strict=True):
        d0, uni = table["original (D0)"], table["uniform"]
        best = {s: max(d0[s], uni[s]) for s in d0 if s in uni}
        labels = [lab for lab in table if lab != "original (D0)"]
        for x, label in enumerate(labels):
            diffs = [table[label][s] - best[s] for s in sorted(best) if s in table[label]]
            if not diffs:
                continue
            ax.scatter([x] * len(diffs), diffs, s=12, color="tab:blue", alpha=0.6)
            se = np.std(diffs, ddof=1) / np.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
            ax.errorbar(x + 0.2, np.mean(diffs), yerr=2 * se, fmt="o", color="black", capsize=3)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=70, ha="right", fontsize=7)
        ax.set_title(name)
    axes[0][0].set_ylabel("mean test acc. - max(D0, uniform)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suites", default="demo,conflict,skewed,noisy")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--methods", default="ideal", help="iterative methods, e.g. ideal,ideal-unseen"
    )
    parser.add_argument("--analyse-only", action="store_true", help="only read finished runs")
    parser.add_argument("--plot", type=Path, help="write the paired differences as a PNG here")
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    tables = {}
    for name in args.suites.split(","):
        out = args.out / name
        if not args.analyse_only:
            config = load_config(
                suite_config(name),
                [
                    f"train.threads={args.threads}",
                    "eval.reference_accuracy=always",
                    *args.overrides,
                ],
            )
            run_compare(config, ["original", "uniform", *args.methods.split(",")], seeds, out)
        table = analyse(name, out, seeds)
        if table is not None:
            tables[name] = table
    if args.plot and tables:
        plot(tables, args.plot)


if __name__ == "__main__":
    main()
