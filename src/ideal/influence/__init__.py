"""Influence: how much each training domain helps each reference capability (METHOD.md).

    capture.py    layer selection by glob; hooks: layer inputs and output gradients
    curvature.py  factors -> eigenbases -> eigenvalue correction -> damped inverse-HVP (pure)
    engine.py     passes over domains and references, exact Gauss-Newton, scores, objective
    refine.py     Gauss-Newton-vector products; conjugate gradient on the reference directions
    plan.py       memory of the step from a model's config alone (meta device): `--plan`
    defaults.py   default sample sizes (no torch: the CLI and config read them)
    command.py    `ideal influence` end to end: load, sample, compute, write json/csv/png

May import: ideal.methods (the update rule gives influence.json its beta), ideal.lm, ideal.data,
ideal.report (plots), and the ground floor. Never ideal.config, ideal.loop or above.
The numerical core (curvature, engine) reads no files.
"""
