"""`python -m benchmarks NAME|all [options]`: run one benchmark, or every one in turn.

The benchmarks sit above `hpo` and `cmath_model` (they import both; neither imports them) and
are not part of the installed package: run them from a source checkout."""

from __future__ import annotations

import importlib
import sys

from . import NAMES


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in (*NAMES, "all"):
        print(f"usage: python -m benchmarks {{{','.join(NAMES)},all}} [--quick] [options]", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    for each in NAMES if name == "all" else [name]:
        print(f"== benchmarks.{each} {' '.join(rest)}", flush=True)
        importlib.import_module(f"benchmarks.{each}").main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
