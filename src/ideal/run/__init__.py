"""Run: what runs a run, from a config to its run directory and a comparison of methods.

    config.py     the run config: the parts' settings embedded, YAML, key=value overrides, hash
    search.py     `search:` of the run config: the cheaper recipe the rounds search with
    preflight.py  every mistake of a run config found before anything trains; the trainer's rows
                  against ideal's for `ideal check --config` (config_parity)
    rundir.py     the run directory: config.yaml, start, resume, start again
    stages.py     one round's work: train, evaluate, proxy runs (DoReMi / DoGE)
    summary.py    summary.json from the round directories, computed once; the returned round
    loop.py       the rounds' state machine (the uniform probe, the update's base round, a search
                  recipe's subsets and the final training)
    influence_round.py  a round's influence.json in the loop, annotated with the step it
                  serves; every copy scored when the capped sample moves nothing (update.rescore)
    step.py       one IDEAL update whose size is measured: candidate steps trained, the best on
                  held-out reference rows kept, the radius carried to the next update
    cells.py      one cell of a comparison (a run with round 0 shared); random and the oracle
                  grid, which train several mixtures and keep one
    compare.py    methods side by side over seeds (`ideal compare`), sharing round 0
    ledger.py     the results ledger: a cell's key, its record, appends under a lock
    fingerprint.py  the code's fingerprint: a micro run's numbers and the rules' proposals
    campaign.py   a comparison kept in the ledger: skip what it holds, workers one per core

May import every part below it: ideal.methods, ideal.influence, ideal.backends, ideal.lm,
ideal.data, ideal.report and the ground floor. Only ideal.cli (and the top-level API) imports it.
"""
