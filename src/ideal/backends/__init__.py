"""Backends: who trains and who evaluates inside the loop (`train.backend`, `eval.backend`).

    protocol.py     the one small protocol (Trainer, Evaluator, their jobs, Score), the check of
                    what an external trainer produced, the documented scores JSON
    train.py        builtin trainer: SFT on Accelerate (full or LoRA, resumable), `ideal train`
    top_layers.py   training only the top K blocks from cached hidden states (`train.top_layers`)
    evaluate.py     builtin evaluator: per-capability loss, greedy decoding, scorers, `ideal eval`
    scorers.py      `choice` (multiple choice by log-likelihood, no generation) and the
                    instruction-following checks (words, keywords, no_commas, lowercase, ...)
    trl_sft.py      `trl`: TRL's SFTTrainer in this process, on ideal's tokens and masks
    external.py     `command`: any trainer or evaluator as a command template (no shell, timeout, log)
    settings.py     `train:` and `eval:` of the run config and the options of `ideal train` / `ideal eval`
    factory.py      the trainer and evaluator a config names
    presets.py      `llamafactory`, `axolotl`, `trl-cli`: the tool's YAML rendered over `command`
    masking.py      where a trainer's template or loss masking differs from ideal's (warnings)
    llamafactory_systems.py  LLaMA-Factory's default system prompt per template (data)
    trainer_rows.py what a tool would do to the rows before it trains (drop, deduplicate, cut)
    parity.py       the rows a tool's own data pipeline builds, against ideal's, row by row
    parity_run.py   the tool's own Python running its probe: `ideal check --config`, each round
    probes/         the scripts that each tool's own Python runs (never imported)
    lmeval.py       `lm-eval`: lm-evaluation-harness in this process; its results-file parser
    opencompass.py  OpenCompass's summary CSV parser

May import: ideal.lm, ideal.data and the ground floor. Not ideal.influence, ideal.methods,
ideal.config or above.
"""
