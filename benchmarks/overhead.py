"""Figure 1, orchestration overhead: Tuner.fit's wall time over the trials' own training time
per parallel slot, for a real sweep (local Ray, Optuna, ASHA, MLflow on sqlite).

    ratio = fit seconds / (sum of every trial's epoch seconds / slots)

ray.init is timed apart. Two sweeps: `cmath` (16 trials of about a minute each, 2 at a time, 1
CPU each) and `empty` (16 trials that do almost no work, so what is left is the cost per trial).
Where the rest goes is read off the sweep's own records: model set-up and checkpoint seconds
reported by each trial, and per-epoch round trips (driver receipt times minus the epoch's work).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd

from .common import DATA, parser, save, synthetic_dataset

SPACES = Path(__file__).resolve().parents[1] / "search_spaces" / "bench"
COLUMNS = ["sweep", "trials", "slots", "ray_init_s", "fit_s", "train_s", "ideal_s", "ratio",
           "overhead_per_trial_s", "setup_s", "checkpoints", "checkpoint_s", "round_trip_ms", "other_s"]


def scenarios(quick: bool) -> list[dict]:
    if quick:
        return [dict(sweep="cmath", space="overhead.yaml", data="tiny", trials=4, slots=2,
                     overrides={"epochs": 8}),
                dict(sweep="empty", space="overhead-empty.yaml", data="tiny", trials=4, slots=2, overrides={})]
    return [dict(sweep="cmath", space="overhead.yaml", data="small", trials=16, slots=2, overrides={}),
            dict(sweep="empty", space="overhead-empty.yaml", data="tiny", trials=16, slots=2, overrides={})]


def run(scenario: dict, work: Path) -> dict:
    from hpo.sweep import SweepOptions, run_sweep

    data = synthetic_dataset(DATA, scenario["data"])
    options = SweepOptions(space=SPACES / scenario["space"], data=str(data), num_samples=scenario["trials"],
                           max_concurrent=scenario["slots"], cpus_per_trial=1, num_cpus=scenario["slots"],
                           results=work, name=scenario["sweep"], overrides=scenario["overrides"],
                           command=f"benchmarks.overhead {scenario['sweep']}")
    outcome = run_sweep(options, log=lambda line: None)
    return measure(scenario, outcome)


def measure(scenario: dict, outcome) -> dict:
    trials = pd.read_parquet(outcome.sweep_dir / "trials.parquet")
    history = pd.read_parquet(outcome.sweep_dir / "history.parquet").sort_values(["trial_id", "epoch"])
    slots = scenario["slots"]
    train = float(history["epoch_seconds"].sum())
    ideal = train / slots
    fit = outcome.fit_seconds
    per_trial = history.groupby("trial_id")
    setup = float(per_trial["setup_seconds"].first().sum())
    # checkpoint_seconds is cumulative per trial and reported with the next epoch, so a trial's
    # last checkpoint (after its last epoch) is not in it; it is part of `other`.
    checkpoint = float(per_trial["checkpoint_seconds"].last().sum())
    checkpoints = int((per_trial["checkpoint_seconds"].diff() > 0).sum())
    gaps = (per_trial["received_at"].diff() - history["epoch_seconds"]
            - per_trial["checkpoint_seconds"].diff()).dropna()
    round_trip = float(gaps.mean()) if len(gaps) else None
    other = fit - ideal - (setup + checkpoint + float(gaps.sum())) / slots
    return dict(sweep=scenario["sweep"], trials=len(trials), slots=slots, data=scenario["data"],
                ray_init_s=outcome.ray_init_seconds, fit_s=fit, train_s=train, ideal_s=ideal, ratio=fit / ideal,
                overhead_per_trial_s=(fit - ideal) * slots / len(trials), setup_s=setup, checkpoints=checkpoints,
                checkpoint_s=checkpoint, round_trip_ms=None if round_trip is None else 1000 * round_trip,
                other_s=other, end_states=trials["end_state"].value_counts().to_dict(),
                epochs=int(len(history)))


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="keep the sweeps' folders (under <out>/work/)")
    p.add_argument("--only", choices=("cmath", "empty"), help="run one of the two sweeps")
    args = p.parse_args(argv)
    args_out = Path(args.out)
    work = args_out / "work" / f"overhead-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = []
    try:
        for scenario in scenarios(args.quick):
            if args.only and scenario["sweep"] != args.only:
                continue
            print(f"overhead: {scenario['sweep']} sweep, {scenario['trials']} trials, {scenario['slots']} at a time",
                  flush=True)
            rows.append(run(scenario, work))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    save("overhead", args, rows, COLUMNS, goal="ratio <= 1.05 for the cmath sweep",
         notes="ratio = fit_s / (train_s / slots); train_s sums every trial's epoch_seconds (train + valid/test "
               "evaluation); setup_s: building models; checkpoint_s: checkpoints reported by trials (a trial's "
               "last one is in other_s); round_trip_ms: per epoch, driver receipt gap minus the epoch's work and "
               "checkpoint; other_s: the rest of fit_s beyond ideal_s per slot (trial starts, ends, idle slots)")


if __name__ == "__main__":
    main()
