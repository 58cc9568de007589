"""Methods: how the next round's volumes follow from what was measured.

    rules.py     update rules: the IDEAL step (its direction judged by each sensitivity's
                 standard error), uniform, temperature, fixed shares,
                 DoReMi / DoGE weight updates and volumes from proxy weights (pure)
    reweight.py  one IDEAL update from influence.json (`ideal reweight`)
    proxy.py     DoReMi / DoGE proxy runs for SFT: domain weights learned while a proxy trains
    select.py    which round a run returns: the last, or the best on the reference sets (pure)
    trust.py     the IDEAL step's round-level control: double m after a round that lowered Q,
                 else start again from the best round with m halved; the candidates' radius
                 from realised / predicted (pure)
    candidates.py  how far to step: candidate steps along the direction, the reference rows held
                 out to compare them, the choice with its paired standard errors and ties (pure)
    surrogate.py a quadratic in log-volumes fitted to trained mixtures' Q and the sensitivities,
                 and its minimiser inside the trust region (pure)
    settings.py  `update:` of the run config and `ideal reweight`'s options (one home each)

May import: ideal.influence (the step reads its sensitivities), ideal.lm, ideal.data and the
ground floor. Not ideal.backends, ideal.run or above.
"""
