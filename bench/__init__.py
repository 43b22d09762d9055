"""The benchmarks: each module runs as ``python -m bench.NAME`` from the repository root and writes
``bench/results/NAME.json``; ``bench.common`` is their shared code."""
