"""The package's layering: benchmarks sit above hpo, hpo above cmath_model, nothing points back;
no module of a package imports itself round in a circle; planning needs no Ray, torch or MLflow;
private names of Ray and Optuna are imported in hpo/_compat.py alone."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Planning and reading a sweep's files: `--dry-run`, `ui`, `report`, `export-best` (without
# --top/--seeds) run on these alone.
PLANNING = ("hpo", "hpo.plan", "hpo.space", "hpo.record", "hpo.trials", "hpo.export", "hpo.report", "hpo.ui",
            "hpo.cli", "hpo.errors", "hpo.storage", "hpo._compat", "cmath_model", "cmath_model.config",
            "cmath_model.data", "cmath_model.synth", "cmath_model.tracking", "cmath_model.errors")
HEAVY = ("ray", "torch", "mlflow")


def _trees(folder: str) -> dict[str, ast.Module]:
    return {str(path.relative_to(REPO)): ast.parse(path.read_text(), str(path))
            for path in sorted((REPO / folder).rglob("*.py"))}


def imported_top_levels(package: str) -> dict[str, set[str]]:
    found = {}
    for path, tree in _trees(package).items():
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[path] = names
    return found


def module_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, at the top or inside a function."""
    graph = {}
    for path, tree in _trees(package).items():
        name = Path(path).stem
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                edges |= {node.module} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(f"{package}."):
                edges.add(node.module.split(".")[1])
        graph[name] = {e.split(".")[0] for e in edges} - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the list of its modules, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.parametrize("package, forbidden", [("hpo", {"benchmarks"}), ("cmath_model", {"benchmarks", "hpo"})])
def test_lower_layers_never_import_higher_ones(package, forbidden):
    offenders = {path: sorted(names & forbidden) for path, names in imported_top_levels(package).items()
                 if names & forbidden}
    assert not offenders


@pytest.mark.parametrize("package", ["hpo", "cmath_model", "benchmarks"])
def test_no_import_cycles_within_a_package(package):
    assert find_cycle(module_graph(package)) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"export": {"rescore"}, "rescore": {"record", "export"}, "record": set()}) == [
        "export", "rescore", "export"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_private_names_of_ray_and_optuna_are_imported_only_in_compat():
    """`from ray.x._private import y`, `import ray._private...`, `from optuna.x import _Name`:
    only hpo/_compat.py, whose tests pin each name to the installed versions."""
    offenders = []
    for folder in ("hpo", "tests", "benchmarks", "cmath_model"):
        for path, tree in _trees(folder).items():
            if path == "hpo/_compat.py":
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    parts, names = node.module.split("."), [a.name for a in node.names]
                elif isinstance(node, ast.Import):
                    parts, names = [p for a in node.names for p in a.name.split(".")], []
                else:
                    continue
                if parts[0] in ("ray", "optuna") and any(p.startswith("_") for p in parts[1:] + names):
                    offenders.append(f"{path}:{node.lineno}")
    assert not offenders


def test_benchmarks_are_not_an_installed_package():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in Python 3.11+")

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not [pattern for pattern in include if pattern.startswith("benchmarks")]


def _run(code: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_the_public_api_is_importable_from_hpo_without_ray_until_used():
    check = ("import sys, hpo; assert 'ray' not in sys.modules, 'import hpo imported ray'\n"
             "from hpo import SweepOptions, export_best, make_report, rescore_best, resume_sweep, run_sweep\n"
             "from hpo.sweep import run_sweep as direct\n"
             "assert run_sweep is direct and all(f.__doc__ and '>>>' in f.__doc__ for f in "
             "(run_sweep, resume_sweep, rescore_best, export_best, make_report))\n"
             "assert SweepOptions(space='x').num_samples == 8")
    done = _run(check)
    assert done.returncode == 0, done.stderr[-2000:]


def test_planning_modules_import_no_ray_torch_or_mlflow():
    check = (f"import importlib, sys\nfor name in {PLANNING!r}: importlib.import_module(name)\n"
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = _run(check)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_dry_run_and_ui_help_load_no_ray_or_torch(tmp_path, tiny_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"search": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
                                     "fixed": {"epochs": 2}, "asha": {"grace_period": 1}}))
    code = ("import sys\nfrom hpo.cli import main\n"
            "def heavy(): return sorted(m for m in ('ray', 'torch') if m in sys.modules)\n"
            f"assert main(['sweep', '--space', {str(space)!r}, '--data', {str(tiny_path)!r}, '--results', "
            f"{str(tmp_path / 'results')!r}, '--dry-run']) == 0\n"
            "print('after dry run', heavy())\n"
            "try:\n    main(['ui', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('after ui --help', heavy())")
    done = _run(code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "after dry run []" in done.stdout and "after ui --help []" in done.stdout, done.stdout[-2000:]
    assert "dry run: nothing started" in done.stdout


def test_every_test_the_docs_name_exists():
    """docs/faults.md names the test behind each fault (`test_x.py::name`); a renamed or deleted
    test would leave a row with nothing behind it."""
    import re

    named, current = [], None
    for doc in sorted((REPO / "docs").glob("*.md")):
        for match in re.finditer(r"`(test_\w+\.py)?(?:::(\w+))?`", doc.read_text()):
            current = match.group(1) or current
            if match.group(2):
                named.append((doc.name, current, match.group(2)))
    assert len(named) >= 20  # the faults table alone names more
    missing = [f"{doc}: {file}::{name}" for doc, file, name in named
               if f"def {name}(" not in (REPO / "tests" / file).read_text()]
    assert not missing, missing
