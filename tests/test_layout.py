"""The package's layering: benchmarks sit above hpo, hpo above cmath_model, nothing points back."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_top_levels(package: str) -> dict[str, set[str]]:
    found = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


@pytest.mark.parametrize("package, forbidden", [("hpo", {"benchmarks"}), ("cmath_model", {"benchmarks", "hpo"})])
def test_lower_layers_never_import_higher_ones(package, forbidden):
    offenders = {path: sorted(names & forbidden) for path, names in imported_top_levels(package).items()
                 if names & forbidden}
    assert not offenders


def test_benchmarks_are_not_an_installed_package():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11+")

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not [pattern for pattern in include if pattern.startswith("benchmarks")]


def test_the_public_api_is_importable_from_hpo_without_ray_until_used():
    import subprocess
    import sys

    check = ("import sys, hpo; assert 'ray' not in sys.modules, 'import hpo imported ray'\n"
             "from hpo import SweepOptions, export_best, make_report, rescore_best, resume_sweep, run_sweep\n"
             "from hpo.sweep import run_sweep as direct\n"
             "assert run_sweep is direct and all(f.__doc__ and '>>>' in f.__doc__ for f in "
             "(run_sweep, resume_sweep, rescore_best, export_best, make_report))\n"
             "assert SweepOptions(space='x').num_samples == 8")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
