"""One method against another, paired over every (campaign, seed) the ledger holds for both.

    python benchmarks/ledger_pool.py docs/ledger.jsonl --method ideal-lowest --baseline ideal \\
        --campaign demo-ties --campaign conflict-ties [...]

    python benchmarks/ledger_pool.py docs/ledger.jsonl --method ideal --baseline ideal-lowest \\
        --campaign noisy-examples:noisy-ties [...]

`--campaign A:B` takes the method's cells from campaign A and the baseline's from B, the same
seeds (a setting tried as an override in a campaign of its own, against cells measured before).
`ideal ledger tables` pairs methods within one campaign (5 seeds); a change meant for every suite
is judged better on all of them together. This prints, per campaign and pooled, the returned
round's mean test accuracy, mean test loss and worst capability's accuracy, method - baseline
per seed, with the mean, its standard error and the verdict at 2 standard errors
(ideal.paired), and how many of the pairs are identical (the two methods returned the same model). Test losses of different suites sit on
different scales: the pooled loss is a mean of differences, not of ratios.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ideal.paired import paired_difference
from ideal.run.campaign import ledger_document

KEYS = (("test_accuracy_mean", False), ("test_loss_mean", True), ("test_accuracy_worst", False))


def by_seed(document: dict, method: str, key: str) -> dict[int, float | None]:
    return {r["seed"]: r["selected"].get(key) for r in document["methods"][method]["runs"]}


def shown(entry: dict) -> str:
    se = entry["stderr"]
    spread = "" if se is None else f" +- {se:.4f}"
    return f"{entry['mean']:+.4f}{spread} ({entry['verdict']})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ledger", type=Path)
    parser.add_argument("--method", required=True)
    parser.add_argument("--baseline", required=True)
    parser.add_argument(
        "--campaign", action="append", required=True, help="CAMPAIGN, or A:B (method's from A)"
    )
    args = parser.parse_args()
    pooled: dict[str, tuple[dict, dict]] = {key: ({}, {}) for key, _ in KEYS}
    same = total = 0
    print(f"{args.method} - {args.baseline}, paired per seed; verdict at 2 standard errors\n")
    print("| campaign | pairs | identical | mean test accuracy | mean test loss | worst accuracy |")
    print("|---|---|---|---|---|---|")
    for campaign in args.campaign:
        mine, _, other = campaign.partition(":")
        document = ledger_document(args.ledger, mine)
        baseline = ledger_document(args.ledger, other) if other else document
        row = []
        for key, lower in KEYS:
            ours = by_seed(document, args.method, key)
            theirs = by_seed(baseline, args.baseline, key)
            row.append(paired_difference(ours, theirs, lower))
            for seed in ours:  # pooled over (campaign, seed): a new index per pair
                pooled[key][0][len(pooled[key][0])] = ours[seed]
                pooled[key][1][len(pooled[key][1])] = theirs.get(seed)
        diffs = row[1]["per_seed"]
        identical = sum(d == 0.0 for d in diffs)
        same, total = same + identical, total + len(diffs)
        print(
            f"| {campaign} | {len(diffs)} | {identical} | {shown(row[0])} | {shown(row[1])} "
            f"| {shown(row[2])} |"
        )
    both = [paired_difference(*pooled[key], lower) for key, lower in KEYS]
    print(f"| pooled | {total} | {same} | {shown(both[0])} | {shown(both[1])} | {shown(both[2])} |")


if __name__ == "__main__":
    main()
