"""logsink's benchmark harness: `harness` is shared by every benchmark (daemon and helper processes,
page warming, CPU readings, interleaved rounds and medians); `engines` is `logsink bench`.

Lives in benchmarks/, outside the installed package: see benchmarks/README.md ("Where the harness lives").
"""
