"""Backends: who trains and who evaluates inside the loop (`train.backend`, `eval.backend`).

    protocol.py   the one small protocol (Trainer, Evaluator, their jobs, Score), the check of
                  what an external trainer produced, the documented scores JSON
    settings.py   `train:` and `eval:` of the run config and the options of `ideal train` / `ideal eval`
    training/     the builtin trainer and the feature cache (top K blocks from cached states)
    evaluation/   the builtin evaluator and its scorers; lm-eval; OpenCompass's results
    tools/        external trainers: command, TRL, the LLaMA-Factory / axolotl / trl-cli presets,
                  the parity checks and their probes
    factory.py    the trainer and evaluator a config names (imports the three above)

Inside: protocol.py, settings.py < training < evaluation < tools < factory.py.

May import: ideal.lm, ideal.data and the ground floor. Not ideal.influence, ideal.methods,
ideal.run or above.
"""
