"""ASHA's footing: does a trial's validation W-F1 at the grace period rank trials as their final
best does? Sweeps without early stopping (random search, every trial runs all its epochs) on the
synthetic `small` set and on the real MELD transcripts, once from the paper's defaults and once
from the recipe's; the row is the Spearman rank correlation over trials between val W-F1 at
the grace-period epoch and the trial's best val W-F1. Goal: >= 0.7 on both datasets.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd
import yaml

from .common import parser, save
from .search import dataset_setup

COLUMNS = ["dataset", "defaults", "seed", "trials", "grace_period", "spearman", "p_value", "first_epoch_at_0.7",
           "best_val_wf1", "fit_s"]
GOAL = 0.7


def rank_correlation(history: pd.DataFrame, grace_period: int) -> tuple[float, float, int]:
    """Spearman rho (and its p-value) over trials that reached the grace period: their val W-F1
    at that epoch against their best over all epochs."""
    from scipy.stats import spearmanr

    at_grace = history[history["epoch"] == grace_period].set_index("trial_id")["val_wf1"]
    final = history.groupby("trial_id")["val_wf1"].max()
    final = final.loc[at_grace.index]
    rho, p = spearmanr(at_grace.to_numpy(), final.to_numpy())
    return float(rho), float(p), len(at_grace)


def footing_by_epoch(history: pd.DataFrame) -> dict[int, float]:
    """rho at every epoch all trials reached: where the ranking settles, i.e. the earliest grace
    period ASHA could be given on this data."""
    last = int(history.groupby("trial_id")["epoch"].max().min())
    return {epoch: round(rank_correlation(history, epoch)[0], 3) for epoch in range(1, last + 1)}


def first_epoch_at(by_epoch: dict[int, float], goal: float = GOAL) -> int | None:
    """The first epoch from which rho stays >= goal."""
    settled = None
    for epoch in sorted(by_epoch, reverse=True):
        if not by_epoch[epoch] >= goal:
            break
        settled = epoch
    return settled


def space_with_defaults(space: Path, defaults: str, work: Path) -> Path:
    raw = yaml.safe_load(space.read_text())
    raw["defaults"] = defaults
    out = work / f"{space.stem}-{defaults}.yaml"
    work.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def run(dataset: str, defaults: str, trials: int, overrides: dict, work: Path, data_dir: Path, scale: str,
        meld_dir: str | None, seed: int | None = None) -> dict:
    from hpo.space import load_space
    from hpo.sweep import SweepOptions, run_sweep

    space, data = dataset_setup(dataset, data_dir, scale, meld_dir)
    space = space_with_defaults(space, defaults, work)
    grace = load_space(space).grace_period
    name = f"footing-{dataset}-{defaults}"
    options = SweepOptions(space=space, data=str(data), num_samples=trials, max_concurrent=2, cpus_per_trial=1,
                           num_cpus=2, results=work, name=name, overrides=overrides, sampler="random",
                           early_stopping=False, seed=seed, command=f"benchmarks.footing {name}")
    started = time.perf_counter()
    outcome = run_sweep(options, log=lambda line: None)
    history = pd.read_parquet(outcome.sweep_dir / "history.parquet")
    rho, p, n = rank_correlation(history, grace)
    by_epoch = footing_by_epoch(history)
    print(f"footing: {name}: spearman {rho:.2f} over {n} trials in {time.perf_counter() - started:.0f}s; "
          f"by epoch {by_epoch}", flush=True)
    return {"dataset": dataset, "defaults": defaults, "seed": seed or 0, "trials": n, "grace_period": grace,
            "spearman": round(rho, 3), "p_value": p, "first_epoch_at_0.7": first_epoch_at(by_epoch),
            "spearman_by_epoch": by_epoch,
            "best_val_wf1": round(100 * float(history["val_wf1"].max()), 2), "fit_s": outcome.fit_seconds}


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--meld-dir", help="MELD transcripts + meld_minilm_all.npy (default ../shared/data/meld)")
    p.add_argument("--datasets", nargs="+", choices=("small", "meld"), help="default: both (quick: small)")
    p.add_argument("--defaults", nargs="+", choices=("paper", "recipe"), help="default: both")
    p.add_argument("--trials", type=int, help="trials per sweep (default 16; quick 4)")
    p.add_argument("--seed", type=int, help="seed of the random search (default: the space's, 0); another seed "
                                            "draws other trials, to check a grace period read off one run")
    args = p.parse_args(argv)
    quick = args.quick
    datasets = args.datasets or (["small"] if quick else ["small", "meld"])
    trials = args.trials or (4 if quick else 16)
    overrides = {"epochs": 4} if quick else {}
    work = Path(args.out) / "work" / f"footing-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = []
    try:
        for dataset in datasets:
            for defaults in args.defaults or ["paper", "recipe"]:
                rows.append(run(dataset, defaults, trials, overrides, work, args.data_dir,
                                "tiny" if quick else "small", args.meld_dir, args.seed))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save("footing", args, rows, COLUMNS, goal=f"spearman >= {GOAL} on small and on MELD",
         notes="random search, no early stopping; spearman over trials between val W-F1 at the grace-period epoch "
               "and the trial's best val W-F1 (search_spaces/bench/search-*.yaml, their grace periods)")


if __name__ == "__main__":
    main()
