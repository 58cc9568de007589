"""Tools: trainers outside ideal's own loop, and the checks that they train on ideal's rows.

    external.py     `command`: any trainer or evaluator as a command template (no shell, timeout, log)
    trl_sft.py      `trl`: TRL's SFTTrainer in this process, on ideal's tokens and masks
    presets.py      `llamafactory`, `axolotl`, `trl-cli`: the tool's YAML rendered over `command`
    masking.py      where a trainer's template or loss masking differs from ideal's (warnings)
    llamafactory_systems.py  LLaMA-Factory's default system prompt per template (data)
    trainer_rows.py what a tool would do to the rows before it trains (drop, deduplicate, cut)
    parity.py       the rows a tool's own data pipeline builds, against ideal's, row by row
    parity_run.py   the tool's own Python running its probe, each round of a preset
    probes/         the scripts that each tool's own Python runs (never imported)

May import: ideal.backends.training (TRL reuses the builtin trainer's settings and LoRA),
ideal.backends.evaluation, ideal.backends' protocol.py and settings.py, ideal.lm, ideal.data and
the ground floor.
"""
