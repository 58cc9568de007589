"""Evaluation: who scores a round's model (`eval.backend`).

    scorers.py      `choice` (multiple choice by log-likelihood, no generation) and the
                    instruction-following checks (words, keywords, no_commas, lowercase, ...)
    evaluate.py     builtin evaluator: per-capability loss, greedy decoding, scorers, `ideal eval`
    lmeval.py       `lm-eval`: lm-evaluation-harness in this process; its results-file parser
    opencompass.py  OpenCompass's summary CSV parser

May import: ideal.backends.training (the feature cache serves losses and choice likelihoods),
ideal.backends' protocol.py and settings.py, ideal.lm, ideal.data and the ground floor. Not
ideal.backends.tools.
"""
