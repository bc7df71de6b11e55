"""Benchmarks: each module measures one figure, prints a table and writes it as JSON to
results/benchmarks/<name>.json. Run one with `python -m benchmarks.<name> [--quick]` or
`cmath-hpo bench <name> [--quick]`; `--quick` is a smoke run, the figures come from full runs."""

NAMES = ("overhead", "speed", "search", "packing", "meld", "footing", "scaling")
