"""Figure 4, GPU packing: 1, 2, 4 and 8 CMATH trials sharing one GPU through fractional GPU
requests (`--gpus-per-trial 1/N`): trials per hour and per-trial slowdown against one trial alone.

Runner `ray` (the default) schedules the sweep's own trainable (hpo.trainable.CMATHTrial) with Ray
Tune at `{"cpu": 1, "gpu": 1/N}` per trial, no searcher and no MLflow (those run on the driver,
not on the GPU), so what is measured is Ray's fractional-GPU placement and the trials' work.
Runner `processes` starts N plain Python processes on the GPU instead, for machines without Ray.
Without a GPU nothing is measured and the JSON says so.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time

import torch

from .common import parser, save, synthetic_dataset

COLUMNS = ["runner", "trials_per_gpu", "gpus_per_trial", "wall_s", "trials_per_hour", "epoch_s", "slowdown",
           "gpu_mem_mb_per_trial"]


def base_config(d: int, epochs: int) -> dict:
    from cmath_model.config import paper_defaults

    return paper_defaults("iemocap").replace(d=d, lr=3e-4, epochs=epochs, device="cuda", num_threads=1,
                                             checkpoint_every=0).to_dict()


def run_ray(n: int, data_path: str, d: int, epochs: int) -> dict:
    import ray
    from ray import tune

    from cmath_model.data import load_dataset
    from hpo.trainable import CMATHTrial

    data = load_dataset(data_path)
    ray.init(address="local", num_cpus=max(8, n), num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        trainable = tune.with_resources(
            tune.with_parameters(CMATHTrial, base=base_config(d, epochs), dataset=data), {"cpu": 1, "gpu": 1 / n})
        with tempfile.TemporaryDirectory() as storage:
            tuner = tune.Tuner(trainable, param_space={"seed": tune.grid_search(list(range(n)))},
                               tune_config=tune.TuneConfig(reuse_actors=False),
                               run_config=tune.RunConfig(storage_path=storage, name=f"pack{n}", verbose=0))
            started = time.perf_counter()
            grid = tuner.fit()
            wall = time.perf_counter() - started
            frames = [r.metrics_dataframe for r in grid]
    finally:
        ray.shutdown()
    epoch_times = [float(f["epoch_seconds"].iloc[1:].mean()) for f in frames]  # the first epoch warms up
    return dict(wall_s=wall, epoch_s=statistics.mean(epoch_times), gpu_mem_mb_per_trial=None,
                trials_finished=sum(len(f) == epochs for f in frames))


def _process_trial(args: tuple) -> dict:
    data_path, d, epochs, seed = args
    from cmath_model.config import from_dict
    from cmath_model.data import load_dataset
    from cmath_model.train import Trainer

    torch.set_num_threads(1)
    trainer = Trainer(from_dict({**base_config(d, epochs), "seed": seed}), load_dataset(data_path))
    times = [trainer.step()["epoch_seconds"] for _ in range(epochs)]
    return dict(epoch_s=statistics.mean(times[1:]), mem=torch.cuda.max_memory_allocated() / 2**20)


def run_processes(n: int, data_path: str, d: int, epochs: int) -> dict:
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        results = pool.map(_process_trial, [(data_path, d, epochs, seed) for seed in range(n)])
    wall = time.perf_counter() - started
    return dict(wall_s=wall, epoch_s=statistics.mean(r["epoch_s"] for r in results),
                gpu_mem_mb_per_trial=statistics.mean(r["mem"] for r in results), trials_finished=len(results))


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--runner", choices=("ray", "processes"), default="ray")
    p.add_argument("--epochs", type=int, help="epochs per trial (default 8; quick 3)")
    p.add_argument("--label", help="suffix for the JSON file, e.g. mps for a run under NVIDIA MPS")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("packing: no GPU visible; not measured")
        save("packing", args, [], COLUMNS, measured=False, notes="not measured: no GPU on this machine")
        return
    data = str(synthetic_dataset(args.data_dir, "small"))
    epochs = args.epochs or (3 if args.quick else 8)
    d = 500
    counts = (1, 2) if args.quick else (1, 2, 4, 8)
    run = run_ray if args.runner == "ray" else run_processes
    rows = []
    for n in counts:
        print(f"packing: {n} trial(s) per GPU ({args.runner})", flush=True)
        r = run(n, data, d, epochs)
        rows.append(dict(runner=args.runner, trials_per_gpu=n, gpus_per_trial=1 / n, d=d, epochs=epochs, **r,
                         trials_per_hour=3600 * n / r["wall_s"]))
    alone = rows[0]["epoch_s"]
    for row in rows:
        row["slowdown"] = row["epoch_s"] / alone - 1
    name = "-".join(filter(None, ["packing", None if args.runner == "ray" else args.runner, args.label]))
    mps = bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))  # set where an NVIDIA MPS daemon serves this GPU
    save(name, args, rows, COLUMNS, measured=True, gpu=torch.cuda.get_device_name(0), mps=mps,
         goal=">= 4 trials per GPU with < 20% per-trial slowdown",
         notes="epoch_s: mean per-trial epoch time (train + valid/test evaluation) after the first epoch; "
               "slowdown: epoch_s / epoch_s with one trial - 1; trials_per_hour: N trials / wall time of the "
               f"N-trial run x 3600 (each trial {epochs} epochs at d {d} on synthetic small, batch 16)")


if __name__ == "__main__":
    main()
