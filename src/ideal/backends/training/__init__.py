"""Training: the builtin trainer (`train.backend: builtin`) and the feature cache under it.

    top_layers.py  training only the top K blocks from cached hidden states (`train.top_layers`):
                   the feature cache, keyed by the frozen bottom; it also serves evaluation and
                   the influence passes
    builtin.py     SFT on Accelerate (full or LoRA, resumable, DDP), `ideal train`

May import: ideal.backends' protocol.py and settings.py, ideal.lm, ideal.data and the ground floor.
Not ideal.backends.evaluation or ideal.backends.tools.
"""
