"""GPU epoch time per speed switch, and a 64-trial sweep on one GPU (run where a GPU is lent).

Part 1 (always, on CUDA): seconds per epoch (`Trainer.step`, after one warm-up epoch) of the
IEMOCAP-size recipe (synthetic `full`, d 500, batch 16, three modalities) and of MELD's recipe
(real transcripts, text; synthetic MELD-size without ../shared), for the defaults and for each
switch of docs/performance.md alone: `precision: bf16`, `compile: default`, `compile:
reduce-overhead` (CUDA graphs, one per batch shape), `adam: foreach`. Each point is a fresh process.

Part 2 (`--sweep`): the whole sweep on one GPU, as issue 14 point 4 asks: 64 trials of the
IEMOCAP-size set, up to 60 epochs with ASHA, 0.25 GPU per trial (four at a time) with CUDA MPS
on when `nvidia-cuda-mps-control` is there (started with its pipe and log folders in a temporary
folder, stopped after); wall time, trials per hour and GPU utilisation (nvidia-smi every 2 s).

What a lent machine needs beyond its torch, pandas and pyarrow: this checkout, and wheels of
ray[tune], optuna and mlflow with their dependencies (`pip download -d wheels -r <(pip freeze)` here,
carried in pieces under 64 MiB, then `pip install --no-index --find-links wheels -e .` there).
Without a GPU it prints "not measured" and exits 0; `--quick` is a smoke run of the same code
paths on tiny data (on the CPU when there is no GPU, so CI can run it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .common import emit_point, parser, run_point, save, synthetic_dataset
from .epoch import measure_time, workloads

SWITCHES = [("defaults", {}), ("precision bf16", {"precision": "bf16"}), ("compile default", {"compile": "default"}),
            ("compile reduce-overhead", {"compile": "reduce-overhead"}), ("adam foreach", {"adam": "foreach"})]
COLUMNS = ["workload", "switch", "device", "s_per_epoch", "train_s_per_epoch", "vs_defaults"]
SWEEP_COLUMNS = ["trials", "gpus_per_trial", "mps", "wall_s", "trials_per_hour", "completed", "stopped",
                 "gpu_util_mean", "gpu_util_p90"]


def epoch_rows(args, device: str) -> list[dict]:
    """Each switch's epoch time on `device`, per workload of benchmarks.epoch, in a fresh process each."""
    switches = SWITCHES[:2] if args.quick else SWITCHES
    rows = []
    for workload in workloads(args):
        baseline = None
        for switch, changes in switches:
            print(f"gpu: {workload['workload']}, {switch}", flush=True)
            result = run_point("gpu", {**workload, "device": device, "threads": 1, "set": changes,
                                       "epochs": 1 if args.quick else 3})
            baseline = baseline or result["s_per_epoch"]
            rows.append(dict(workload=workload["workload"], switch=switch, device=device, **result,
                             vs_defaults=result["s_per_epoch"] / baseline))
    return rows


class _Utilisation:
    """nvidia-smi's GPU utilisation, sampled every `period` seconds in a thread until stopped."""

    def __init__(self, period: float = 2.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            done = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=30)
            if done.returncode == 0 and done.stdout.strip():
                self.samples.append(float(done.stdout.split()[0]))

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def _mps(folder: Path) -> dict | None:
    """Start the CUDA MPS control daemon with its folders under `folder`; the env trials need, or None."""
    if not shutil.which("nvidia-cuda-mps-control"):
        return None
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for path in env.values():
        Path(path).mkdir(parents=True)
    import os

    subprocess.run(["nvidia-cuda-mps-control", "-d"], env={**os.environ, **env}, check=True, timeout=30)
    return env


def sweep_row(args, gpus_per_trial: float) -> dict:
    import os

    from hpo.sweep import SweepOptions, run_sweep

    trials, epochs = (4, 6) if args.quick else (64, 60)  # 6: past iemocap.yaml's grace period
    data = synthetic_dataset(args.data_dir, "tiny" if args.quick else "full")
    space = Path(__file__).resolve().parents[1] / "search_spaces" / "iemocap.yaml"
    work = Path(args.out) / f"gpu-sweep{'-quick' if args.quick else ''}"  # kept: the sweep's tables and MLflow
    shutil.rmtree(work, ignore_errors=True)
    mps = _mps(Path(tempfile.mkdtemp(prefix="mps-"))) if gpus_per_trial else None
    saved = {key: os.environ.get(key) for key in (mps or {})}
    os.environ.update(mps or {})  # the local Ray's workers inherit it
    try:
        with _Utilisation() as utilisation:
            started = time.monotonic()
            outcome = run_sweep(SweepOptions(space=space, data=str(data), num_samples=trials,
                                             gpus_per_trial=gpus_per_trial, cpus_per_trial=1, results=work,
                                             name="gpu64", max_concurrent=4,
                                             overrides={"epochs": epochs, "checkpoint_every": 0},
                                             command="benchmarks.gpu --sweep"), log=print)
            wall = time.monotonic() - started
    finally:
        if mps:
            subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env={**os.environ, **mps},
                           timeout=60)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    counts = outcome.counts
    samples = sorted(utilisation.samples)
    return dict(trials=trials, gpus_per_trial=gpus_per_trial, mps=bool(mps), wall_s=wall,
                trials_per_hour=3600 * trials / wall, completed=counts.get("completed"),
                stopped=counts.get("stopped_by_asha"),
                gpu_util_mean=sum(samples) / len(samples) if samples else None,
                gpu_util_p90=samples[int(0.9 * (len(samples) - 1))] if samples else None)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="also run the 64-trial sweep on one GPU")
    args = p.parse_args(argv)
    if args.point:
        emit_point(measure_time(json.loads(args.point)))
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else ("cpu" if args.quick else None)
    if device is None:
        print("gpu: not measured: no CUDA device here (python -m benchmarks gpu --quick runs the same code on the CPU)")
        return
    rows = epoch_rows(args, device)
    sweep = [sweep_row(args, 0.25 if device == "cuda" else 0.0)] if args.sweep else []
    if sweep:
        from .common import table

        print(table(sweep, SWEEP_COLUMNS))
    save("gpu", args, rows, COLUMNS, sweep=sweep,
         notes="s_per_epoch: Trainer.step (train, then score valid and test), mean of the timed epochs after one "
               "warm-up epoch, each point a fresh process; vs_defaults: this switch's time / the defaults' time")


if __name__ == "__main__":
    main()
