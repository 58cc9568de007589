"""Influence: how much each training domain helps each reference capability (docs/method.md).

    settings.py    InfluenceConfig (`influence:` of the run config, the options of `ideal
                   influence`), the engine's InfluenceSettings, InfluenceJob (one run of the
                   step); no torch: the CLI and the run config read them at start-up
    capture.py     layer selection by glob; hooks: layer inputs and output gradients
    curvature.py   factors -> eigenbases -> eigenvalue correction -> damped inverse-HVP (pure)
    results.py     WeightedSet (a sample of tokenized examples with copies), InfluenceResult
    passes.py      InfluenceEngine: the passes over references, curvature sample and domains
    exact.py       the dense Gauss-Newton matrix and its solve (`curvature: exact`; tiny models)
    refine.py      Gauss-Newton-vector products; conjugate gradient on the reference directions
    statistics.py  domain scores from per-example contributions, with standard errors
    engine.py      domain_influence: the passes in order, per layer group; the preconditioner
    objective.py   objective weights w_j and sensitivities dQ/dbeta_i: influence.json's summary
    plan.py        memory of the step from a model's config alone (meta device): `--plan`
    step.py        the step end to end (`ideal influence`, each round of `ideal run`): load,
                   sample, compute, write json/csv/png

May import: ideal.lm, ideal.data, ideal.report (plots), and the ground floor. Never ideal.methods
(the update rule turns influence.json's sensitivities into a step: it imports this part),
ideal.run or above. The numerical core (curvature, passes, statistics, engine)
reads no files.
"""
