"""Backends: who trains and who evaluates inside the loop.

    train.py     the builtin trainer: SFT on Accelerate (full or LoRA, resumable), `ideal train`
    evaluate.py  the builtin evaluator: per-capability loss, greedy decoding, scorers, `ideal eval`

May import: ideal.lm, ideal.data and the ground floor. Not ideal.influence, ideal.methods,
ideal.config or above.
"""
