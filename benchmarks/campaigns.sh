#!/usr/bin/env bash
# The measurements behind docs/results.md's ledger tables, one `ideal compare --ledger` each.
#
#     bash benchmarks/campaigns.sh [real|toys|ties|examples|rescore|search|rank|rounds3|all]      (JOBS=2 for two worker processes)
#
# Every cell lands in docs/ledger.jsonl as soon as it finishes; a cell the ledger already holds for
# the same inputs (settings, data, the code's fingerprint) is skipped, so this can be stopped at
# any moment and started again, in this session or the next, on this machine or another (its
# cells say which). Then `ideal ledger tables docs/ledger.jsonl --write docs/results.md`.
# The real preset needs `ideal suite prepare real real-data` first (REAL=path to use another).
set -euo pipefail
cd "$(dirname "$0")/.."
IDEAL=${IDEAL:-.venv/bin/ideal}
LEDGER=${LEDGER:-docs/ledger.jsonl}
OUT=${OUT:-campaigns}
JOBS=${JOBS:-1}
REAL=${REAL:-real-data}
WHAT=${1:-all}
SUITES=${SUITES:-demo conflict skewed noisy}  # the toy suites of `search` (one worker per subset)
SEARCH_REAL=${SEARCH_REAL:-1}                 # 0: `search` leaves the real preset out
real_data=(model="$REAL/model" train_data="$REAL/train" reference_data="$REAL/reference"
           test_data="$REAL/test")

compare() {  # compare CAMPAIGN CONFIG METHODS SEEDS [overrides...]
  local campaign=$1 config=$2 methods=$3 seeds=$4
  shift 4
  "$IDEAL" compare "$config" "$@" --methods "$methods" --seeds "$seeds" --ledger "$LEDGER" \
    --campaign "$campaign" --out "$OUT/$campaign" --jobs "$JOBS" --features "$OUT/features"
}

if [[ $WHAT == real || $WHAT == all ]]; then
  # the real preset with its defaults (rounds 2: the probe, then one update by candidate steps)
  compare real-defaults src/ideal/configs/real.yaml original,uniform,random,ideal,first-order \
    0-4 "${real_data[@]}"
fi

if [[ $WHAT == toys || $WHAT == all ]]; then
  # the toy suites with the library's default rounds (2), beside the random control, the
  # paper's single step and the surrogate
  methods=original,uniform,random,ideal,ideal-single-step,ideal-surrogate
  compare demo-defaults src/ideal/configs/demo.yaml $methods 0-4
  for suite in conflict skewed noisy; do
    compare "$suite-defaults" "benchmarks/suites/$suite.yaml" $methods 0-4 rounds=2
  done
fi

if [[ $WHAT == ties || $WHAT == all ]]; then
  # the tie rule `lowest` against the default `smaller`, on seeds that did not suggest it:
  # benchmarks/step_ties.py replayed the rules on seeds 0-4's trained candidates (real preset, 10
  # updates: lowest - smaller -0.0036 +- 0.0015 mean test loss), so fresh seeds confirm or refute it.
  # Run (2026-12-05) while `smaller` was the default: `ideal` there is ties: smaller. `lowest` is
  # the default since, so a rerun would train ideal and ideal-lowest alike: the old rule is now
  # the method ideal-smaller
  compare real-ties src/ideal/configs/real.yaml uniform,ideal,ideal-lowest 5-9 "${real_data[@]}"
  for suite in demo conflict skewed noisy; do
    config=benchmarks/suites/$suite.yaml
    [[ $suite == demo ]] && config=src/ideal/configs/demo.yaml
    compare "$suite-ties" "$config" uniform,ideal,ideal-lowest 5-9 rounds=2
  done
fi

if [[ $WHAT == examples || $WHAT == all ]]; then
  # less noise in the direction: every copy's score (influence.max_examples: all, default 64; at
  # sample 0.5 that is half of each domain) on the toys' seeds 5-9, ideal only, paired against
  # the ties campaign's ideal-lowest (today's ideal) on the same seeds:
  #   python benchmarks/ledger_pool.py docs/ledger.jsonl --method ideal --baseline ideal-lowest \
  #     --campaign noisy-examples-all:noisy-ties [...]
  # Registered before the cells ran (2026-12-05): a candidate default if the pooled test loss
  # falls by more than 2 paired standard errors and accuracy does not fall by more than 2; the
  # real preset then has to confirm it before it becomes one.
  for suite in noisy skewed demo conflict; do
    config=benchmarks/suites/$suite.yaml
    [[ $suite == demo ]] && config=src/ideal/configs/demo.yaml
    compare "$suite-examples-all" "$config" ideal 5-9 rounds=2 influence.max_examples=all
  done
fi

if [[ $WHAT == rescore || $WHAT == all ]]; then
  # every copy scored only where the capped sample moves nothing (update.rescore), on fresh seeds
  # 10-14 of the four toys, paired against today's ideal on the same seeds:
  #   python benchmarks/ledger_pool.py docs/ledger.jsonl --method ideal-rescore --baseline ideal \
  #     --campaign noisy-rescore [...]
  # Replayed first on seeds 5-9 (the examples-all cells where ideal's gate held everything:
  # +0.0097 +- 0.0061 accuracy, -0.0216 +- 0.0110 test loss over 20 pairs, 5 of them changed),
  # which chose the rule. Registered before these cells ran (2026-12-05): a candidate default if
  # the pooled test loss over seeds 10-14 falls by more than 2 paired standard errors and the
  # accuracy and worst capability do not fall by more than 2; the real preset (whose gate held
  # 1 update of 10) has to confirm it before it becomes one.
  # [Corrected after: the real preset's gate held none of its 10 updates (the 1 was a kept base,
  # counted wrong); benchmarks/step_activity.py --config shows the rule never fires on its
  # seeds 0-9, so there it changes nothing. Met on seeds 10-14: loss -0.043 +- 0.019, accuracy
  # +0.024 +- 0.011, worst +0.001 +- 0.006 (20 pairs, 5 changed); default since 2026-12-05.]
  for suite in noisy skewed demo conflict; do
    config=benchmarks/suites/$suite.yaml
    [[ $suite == demo ]] && config=src/ideal/configs/demo.yaml
    compare "$suite-rescore" "$config" ideal,ideal-rescore 10-14 rounds=2
  done
fi

if [[ $WHAT == search || $WHAT == all ]]; then
  # search cheap, train once: each proxy against the full recipe (cost_in_sfts, transfer); the
  # `ideal` cells are the same in every campaign of a suite, so they are trained once
  for suite in $SUITES; do
    config=benchmarks/suites/$suite.yaml
    [[ $suite == demo ]] && config=src/ideal/configs/demo.yaml
    compare "$suite-search-fraction-0.25" "$config" ideal,ideal-search 0-4 rounds=2 \
      search.fraction=0.25
    compare "$suite-search-fraction-0.1" "$config" ideal,ideal-search 0-4 rounds=2 \
      search.fraction=0.1
    compare "$suite-search-steps-0.25" "$config" ideal,ideal-search 0-4 rounds=2 \
      search.fraction=1.0 "search.train={max_steps: 250}"
    compare "$suite-search-top1-lora" "$config" ideal,ideal-search 0-4 rounds=2 \
      search.fraction=1.0 "search.train={top_layers: 1, lora: true}"
  done
  for fraction in 0.25 0.1; do
    [[ $SEARCH_REAL == 1 ]] || break
    compare "real-search-fraction-$fraction" src/ideal/configs/real.yaml ideal,ideal-search 0-2 \
      "${real_data[@]}" "search.fraction=$fraction"
  done
fi

if [[ $WHAT == rank || $WHAT == all ]]; then
  # the proxy's rank correlation with the full recipe over the grid of mixtures on the real preset
  # (not ledger cells: OUT/rank-real/config/rank.json, rewritten after each seed; resumable)
  "${IDEAL%/ideal}/python" benchmarks/search_transfer.py --rank --config src/ideal/configs/real.yaml \
    --seeds 3 --proxies fraction-0.25,fraction-0.1 --out "$OUT/rank-real" --features "$OUT/features" \
    "${real_data[@]}"
fi

if [[ $WHAT == rounds3 || $WHAT == all ]]; then
  # a second IDEAL update on the real preset (rounds 3: the probe, then two updates; 3 trainings
  # more a run), paired against the defaults campaign's ideal (rounds 2) on the same seeds:
  #   python benchmarks/ledger_pool.py docs/ledger.jsonl --method ideal --baseline ideal \
  #     --campaign real-rounds3:real-defaults
  # Why: the real preset kept a candidate step on 9 of 10 updates, its returned reference loss
  # (0.347-0.370, seeds 0-4) is above the grid's lowest on seed 2 (0.342) and random search's
  # on seeds 0, 2, 3 (0.323-0.345), and the radius can only grow on a later update.
  # Registered before the cells ran (2026-12-06): rounds 3 becomes the preset's default only if
  # the mean test accuracy rises by more than 2 paired standard errors and the test loss and
  # worst capability do not fall behind by more than 2; random search at 8 trainings (the fair
  # control at that cost) then has to be run too. Otherwise the result is recorded, the default
  # stays rounds 2.
  # [Result (2026-12-06): not met. 4 of 5 runs identical to rounds 2 (the second update kept the
  # base on seeds 0, 1, 4; seed 3 stopped at the first), accuracy -0.0013 +- 0.0013; the base's
  # held-out loss is the lowest of the first update's candidates on the same rows (docs/results.md).]
  compare real-rounds3 src/ideal/configs/real.yaml ideal 0-4 "${real_data[@]}" rounds=3
fi
