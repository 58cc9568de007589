"""Data: what the mixture is made of, on disk and in memory.

    examples.py    Example: one validated row (its messages, answer, source); OnInvalid
    files.py       data files on disk (jsonl, json, parquet, datasets) -> raw rows with locations
    rows.py        domains on disk -> validated rows -> chat messages (re-exports tokens.py)
    tokens.py      chat messages -> token ids + loss labels (chat template, boundary, truncation)
    mixture.py     volumes, constraints, seeded incremental resampling (pure, numpy)
    mixture_io.py  a mixture on disk: read (back to its pool), write with its manifest
    export.py      a mixture as LLaMA-Factory / TRL / axolotl files
    suite.py       the embedded multi-capability toy suite: tasks, splits, tiny base model
    real.py        the real preset from registry packages: SmolLM2 GGUF -> HF model; GSM-Symbolic,
                   BIG-bench and IFEval-style domains, a harmful source, splits

May import: the ground floor only (ideal.errors, ideal.artifacts, ideal.hf, ideal.tiny,
ideal.distributed, ideal.progress). Nothing here knows about models' training or influence.
"""
