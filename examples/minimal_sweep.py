"""A CMATH sweep on one page: CMATH trials on Ray Tune, Optuna's TPE (told which trials ASHA
stopped), ASHA, and Tuner.fit. `cmath-hpo sweep` (hpo.sweep.run_sweep) builds exactly this in
hpo/tuner.py, with the checks, the MLflow record, the tables and resume around it.

    python examples/minimal_sweep.py [--samples 6] [--epochs 4] [--out DIR]
"""

import argparse
import tempfile
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter

from cmath_model import load_dataset
from cmath_model.synth import write_synthetic
from hpo.search import SweepSearch
from hpo.space import parse_space
from hpo.trainable import CMATHTrial

SPACE = {"name": "minimal", "dataset": "iemocap", "seed": 0,
         "search": {"d": {"type": "int", "low": 32, "high": 96, "step": 32},
                    "lr": {"type": "loguniform", "low": 3e-4, "high": 3e-3}},
         "fixed": {"batch_size": 4}}


def main(samples: int = 6, epochs: int = 4, out: str | None = None) -> dict:
    folder = Path(out or tempfile.mkdtemp(prefix="minimal-sweep-"))
    space = parse_space({**SPACE, "fixed": {**SPACE["fixed"], "epochs": epochs}}, "minimal")
    data = load_dataset(write_synthetic(folder / "tiny.parquet", "iemocap", "tiny"))
    base = space.base_config(num_threads=1).to_dict()  # one torch thread per trial: one CPU each
    trainable = tune.with_resources(tune.with_parameters(CMATHTrial, base=base, dataset=data), {"cpu": 1})
    searcher = ConcurrencyLimiter(SweepSearch(space, n_startup_trials=2), max_concurrent=2)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=1, reduction_factor=2)
    tuner = tune.Tuner(trainable,
                       tune_config=tune.TuneConfig(metric="val_wf1", mode="max", search_alg=searcher,
                                                   scheduler=scheduler, num_samples=samples),
                       run_config=tune.RunConfig(storage_path=str(folder / "ray"), verbose=0))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        grid = tuner.fit()
    finally:
        ray.shutdown()
    best = grid.get_best_result(metric="best_val_wf1", mode="max", scope="last")
    print(f"{len(grid)} trials; best d={best.config['d']} lr={best.config['lr']:.2g}: "
          f"val W-F1 {100 * best.metrics['best_val_wf1']:.2f} at epoch {best.metrics['best_epoch']}")
    return best.metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", help="folder for the data and Ray's trial folders (default: a new temp folder)")
    args = parser.parse_args()
    main(args.samples, args.epochs, args.out)
