"""cmath-hpo: CMATH hyperparameter sweeps with Ray Tune, Optuna, ASHA and MLflow.

The library behind `cmath-hpo` (each verb is a thin call of one of these):

    from hpo import SweepOptions, run_sweep, resume_sweep, rescore_best, export_best, make_report

    outcome = run_sweep(SweepOptions(space="search_spaces/quickstart.yaml", num_samples=8))
    rescore_best(outcome.sweep_dir, top=3, seeds=3)  # optional: the top 3 trials again, 3 new seeds each
    export_best(outcome.sweep_dir, "best.yaml")      # then: cmath-train --config best.yaml --seeds 5
    make_report(outcome.sweep_dir)                   # plots + report.md in <sweep>/report/

`import hpo` imports no Ray: each name loads its module when first used.
"""

from importlib import import_module

_HOMES = {"SweepOptions": "plan", "plan_sweep": "plan", "run_sweep": "sweep", "SweepOutcome": "sweep",
          "resume_sweep": "resume", "rescore_best": "rescore", "export_best": "export", "make_report": "report"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'hpo' has no attribute {name!r}")
