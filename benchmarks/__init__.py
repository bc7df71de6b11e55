"""Benchmarks: each module measures one figure, prints a table and writes it as JSON to
results/benchmarks/<name>.json. Run one from a source checkout with `python -m benchmarks <name>
[--quick]` (or `python -m benchmarks.<name>`, `cmath-hpo bench <name>`); `--quick` is a smoke run,
the figures come from full runs. The benchmarks import hpo and cmath_model; neither imports them."""

NAMES = ("overhead", "speed", "epoch", "gpu", "search", "packing", "meld", "recipe", "footing", "scaling", "driver")
