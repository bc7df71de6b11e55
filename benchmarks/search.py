"""Figure 3, search efficiency: Optuna TPE + ASHA against random search without early stopping,
the same number of trials and the same warm start, over several seeds, on the synthetic `small`
set and on the real MELD transcripts (text only).

Epochs are counted in the order trials finished: (a) all epochs a search spent; (b) epochs spent
until its best val W-F1 so far first came within 0.5 points of random search's final best (same
dataset and seed). Goal: (b) for TPE + ASHA <= a third of random search's (a).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import pandas as pd

from .common import meld_text_dataset, parser, save, synthetic_dataset

SPACES = Path(__file__).resolve().parents[1] / "search_spaces" / "bench"
WITHIN = 0.005  # 0.5 W-F1 points
METHODS = {"tpe_asha": dict(sampler="tpe", early_stopping=True),
           "random": dict(sampler="random", early_stopping=False)}
COLUMNS = ["dataset", "seed", "method", "trials", "stopped", "epochs_total", "best_val_wf1", "test_wf1_at_best",
           "epochs_to_within", "fraction_of_random_total", "fit_s"]


def settings(quick: bool) -> dict:
    if quick:
        return dict(datasets=["small"], seeds=[0], trials=4, overrides={"epochs": 4}, data_scale="tiny")
    return dict(datasets=["small", "meld"], seeds=[0, 1, 2], trials=16, overrides={}, data_scale="small")


def dataset_setup(name: str, work: Path, scale: str, meld_dir: str | None) -> tuple[Path, Path]:
    if name == "meld":
        return SPACES / "search-meld.yaml", meld_text_dataset(work, meld_dir)
    return SPACES / "search-small.yaml", synthetic_dataset(work, scale)


def run_search(space: Path, data: Path, method: str, seed: int, trials: int, overrides: dict, work: Path,
               name: str) -> tuple[pd.DataFrame, float]:
    from hpo.sweep import SweepOptions, run_sweep

    started = time.perf_counter()
    options = SweepOptions(space=space, data=str(data), num_samples=trials, max_concurrent=2, cpus_per_trial=1,
                           num_cpus=2, results=work, name=name, seed=seed, overrides={**overrides, "seed": seed},
                           command=f"benchmarks.search {name}", **METHODS[method])
    outcome = run_sweep(options, log=lambda line: None)
    print(f"search: {name}: {outcome.counts} in {time.perf_counter() - started:.0f}s", flush=True)
    return curve(outcome.sweep_dir), outcome.fit_seconds


def finished_sweep(sweep_dir: Path) -> tuple[pd.DataFrame, float] | None:
    """A sweep an earlier run of this benchmark finished in the same --work folder."""
    path = sweep_dir / "sweep.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if record.get("status") != "finished":
        shutil.rmtree(sweep_dir, ignore_errors=True)  # an unfinished one is run again from the start
        return None
    print(f"search: {sweep_dir.name}: reused from {sweep_dir}", flush=True)
    return curve(sweep_dir), float(record["fit_seconds"])


def curve(sweep_dir: Path) -> pd.DataFrame:
    """Trials in the order they finished, with cumulative epochs and the best val W-F1 so far."""
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    # Only trials that ran to an end here (not runs an earlier, killed attempt left open in MLflow).
    trials = trials[trials["finished_at"].notna()].sort_values("finished_at")
    trials["epochs_so_far"] = trials["epochs"].cumsum()
    trials["best_so_far"] = trials["best_val_wf1"].cummax()
    return trials


def epochs_to_reach(trials: pd.DataFrame, target: float) -> int | None:
    reached = trials[trials["best_so_far"] >= target]
    return int(reached["epochs_so_far"].iloc[0]) if len(reached) else None


def compare(runs: dict[str, tuple[pd.DataFrame, float]], dataset: str, seed: int) -> list[dict]:
    random_trials = runs["random"][0]
    target = random_trials["best_val_wf1"].max() - WITHIN
    random_total = int(random_trials["epochs"].sum())
    rows = []
    for method, (trials, fit) in runs.items():
        best = trials.loc[trials["best_val_wf1"].idxmax()]
        reach = epochs_to_reach(trials, target)
        rows.append(dict(dataset=dataset, seed=seed, method=method, trials=len(trials),
                         stopped=int((trials["end_state"] == "stopped_by_asha").sum()),
                         epochs_total=int(trials["epochs"].sum()), best_val_wf1=float(best["best_val_wf1"]),
                         test_wf1_at_best=float(best["test_wf1_at_best_val"]), epochs_to_within=reach,
                         fraction_of_random_total=None if reach is None else reach / random_total, fit_s=fit,
                         curve=trials[["trial_id", "epochs", "best_val_wf1", "epochs_so_far", "best_so_far",
                                       "end_state"]].to_dict("records")))
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over seeds per dataset and method; a search that never came within 0.5 counts its total."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for method in METHODS:
            mine = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
            reach = [r["fraction_of_random_total"] if r["fraction_of_random_total"] is not None
                     else r["epochs_total"] / max(1, _random_total(rows, r)) for r in mine]
            out.append(dict(dataset=dataset, seed="mean", method=method, trials=mine[0]["trials"],
                            stopped=statistics.mean(r["stopped"] for r in mine),
                            epochs_total=statistics.mean(r["epochs_total"] for r in mine),
                            best_val_wf1=statistics.mean(r["best_val_wf1"] for r in mine),
                            test_wf1_at_best=statistics.mean(r["test_wf1_at_best"] for r in mine),
                            epochs_to_within=statistics.mean(r["epochs_to_within"] or r["epochs_total"] for r in mine),
                            fraction_of_random_total=statistics.mean(reach),
                            fit_s=statistics.mean(r["fit_s"] for r in mine)))
    return out


def _random_total(rows: list[dict], row: dict) -> int:
    return next(r["epochs_total"] for r in rows
                if r["dataset"] == row["dataset"] and r["seed"] == row["seed"] and r["method"] == "random")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--meld-dir", help="MELD transcripts + meld_minilm_all.npy (default ../shared/data/meld)")
    p.add_argument("--datasets", nargs="+", choices=("small", "meld"), help="default: both (quick: small)")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (quick: 0)")
    p.add_argument("--trials", type=int, help="trials per search (default 16; quick 4)")
    p.add_argument("--work", help="folder for the sweeps, kept; a sweep already finished there is reused "
                                  "(default: a new folder under <out>/work/, deleted at the end)")
    args = p.parse_args(argv)
    s = settings(args.quick)
    datasets, seeds = args.datasets or s["datasets"], args.seeds or s["seeds"]
    s["trials"] = args.trials or s["trials"]
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work" / f"search-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = []
    try:
        for dataset in datasets:
            space, data = dataset_setup(dataset, args.data_dir, s["data_scale"], args.meld_dir)
            for seed in seeds:
                runs = {}
                for method in METHODS:
                    name = f"{dataset}-{method}-seed{seed}"
                    runs[method] = finished_sweep(work / name) or run_search(
                        space, data, method, seed, s["trials"], s["overrides"], work, name)
                rows += compare(runs, dataset, seed)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    table_rows = [{k: v for k, v in r.items() if k != "curve"} for r in rows] + summarise(rows)
    name = "search" if set(datasets) == {"small", "meld"} else f"search-{'-'.join(datasets)}"
    save(name, args, table_rows, COLUMNS, per_seed=rows, goal="tpe_asha epochs_to_within <= 1/3 of random "
         "epochs_total (fraction_of_random_total <= 0.333)",
         notes="epochs counted in the order trials finished; epochs_to_within: until the best val W-F1 so far came "
               "within 0.5 points of random search's final best (same dataset and seed); a mean row counts a search "
               "that never got there with its total")


if __name__ == "__main__":
    main()
