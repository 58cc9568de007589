"""Default sample sizes of the influence step, shared by the command line, the run config and the
API without importing torch. Chosen from the measured accuracy-vs-cost curve (docs/results.md,
`benchmarks/influence_overhead.py --curve`)."""

CURVATURE_EXAMPLES = 128  # copies of the mixture the curvature is fitted on
MAX_EXAMPLES = 64  # at most this many copies per domain for its score
SAMPLE = 0.5  # fraction of each domain's copies, before the cap
