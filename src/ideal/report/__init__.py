"""Report: plots and HTML pages, made from artifacts only.

    plots.py    the influence heatmap, domain weights along a proxy run
    run.py      a run's plots and report.html (`ideal report`)
    compare.py  compare.html and the accuracy-vs-compute plot
    console.py  the command line's tables, as pure functions of the records
    parity.py   `ideal check --config`'s table of the trainer's rows against ideal's
    ledger.py   docs/results.md's paired tables from a campaign of the results ledger

May import: ideal.records and the ground floor (ideal.errors, ideal.artifacts, ...). It reads what the other parts
wrote; it never trains, scores or resamples.
"""
