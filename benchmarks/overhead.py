"""Figure 1, orchestration overhead: Tuner.fit's wall time over the trials' own training time
per parallel slot, for a real sweep (local Ray, Optuna, ASHA, MLflow on sqlite).

    ratio = fit seconds / (sum of every trial's epoch seconds / slots)

ray.init is timed apart. Two sweeps: `cmath` (16 trials of about a minute each, 2 at a time, 1
CPU each) and `empty` (16 trials that do almost no work, so what is left is the cost per trial).
Where the rest goes is read off the sweep's own records: model set-up and checkpoint seconds
reported by each trial, and per-epoch round trips (driver receipt times minus the epoch's work).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd

from .common import parser, save, synthetic_dataset

SPACES = Path(__file__).resolve().parents[1] / "search_spaces" / "bench"
COLUMNS = ["sweep", "trials", "slots", "ray_init_s", "fit_s", "train_s", "ideal_s", "ratio", "overhead_per_trial_s",
           "startup_s", "setup_s", "checkpoints", "checkpoint_s", "round_trip_ms", "tail_idle_s", "teardown_s",
           "other_s"]


def scenarios(quick: bool) -> list[dict]:
    if quick:
        return [dict(sweep="cmath", space="overhead.yaml", data="tiny", trials=4, slots=2,
                     overrides={"epochs": 8}),
                dict(sweep="empty", space="overhead-empty.yaml", data="tiny", trials=4, slots=2, overrides={})]
    return [dict(sweep="cmath", space="overhead.yaml", data="small", trials=16, slots=2, overrides={}),
            dict(sweep="empty", space="overhead-empty.yaml", data="tiny", trials=16, slots=2, overrides={})]


def run(scenario: dict, work: Path, data_dir: Path) -> dict:
    from hpo.sweep import SweepOptions, run_sweep

    data = synthetic_dataset(data_dir, scenario["data"])
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
    if "checkpoint_seconds" not in history:  # a sweep from before the trials reported these
        history = history.assign(setup_seconds=0.0, checkpoint_seconds=0.0, received_at=float("nan"))
    per_trial = history.groupby("trial_id")
    setup = float(per_trial["setup_seconds"].first().sum())
    # checkpoint_seconds is cumulative per trial and reported with the next epoch, so a trial's
    # last checkpoint (after its last epoch) is not in it; it is part of `other`.
    checkpoint = float(per_trial["checkpoint_seconds"].last().sum())
    checkpoints = int((per_trial["checkpoint_seconds"].diff() > 0).sum())
    gaps = (per_trial["received_at"].diff() - history["epoch_seconds"]
            - per_trial["checkpoint_seconds"].diff()).dropna()
    round_trip = float(gaps.mean()) if len(gaps) else None
    # The sweep's timeline: from Tuner.fit to the first trial; the slots' idle time at the end
    # (a slot with nothing left to run waits for the last trial); from the last trial to fit's end.
    record = json.loads((outcome.sweep_dir / "sweep.json").read_text())
    fit_start = record.get("fit_started_at")
    ends = sorted(trials["finished_at"].dropna())[-slots:]
    startup = float(trials["started_at"].min() - fit_start) if fit_start else None
    tail = sum(ends[-1] - end for end in ends) / slots
    teardown = float(fit_start + fit - ends[-1]) if fit_start else None
    known = setup + checkpoint + float(gaps.sum())
    other = fit - ideal - known / slots - tail - (startup or 0) - (teardown or 0)
    return dict(sweep=scenario["sweep"], trials=len(trials), slots=slots, data=scenario["data"],
                ray_init_s=outcome.ray_init_seconds, fit_s=fit, train_s=train, ideal_s=ideal, ratio=fit / ideal,
                overhead_per_trial_s=(fit - ideal) * slots / len(trials), setup_s=setup, checkpoints=checkpoints,
                checkpoint_s=checkpoint, round_trip_ms=None if round_trip is None else 1000 * round_trip,
                startup_s=startup, tail_idle_s=tail, teardown_s=teardown, other_s=other, epochs=int(len(history)),
                end_states=trials["end_state"].value_counts().to_dict())


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
            rows.append(run(scenario, work, args.data_dir))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    save("overhead", args, rows, COLUMNS, goal="ratio <= 1.05 for the cmath sweep",
         notes="ratio = fit_s / (train_s / slots); train_s sums every trial's epoch_seconds (train + valid/test "
               "evaluation). Where fit_s - ideal_s goes: startup_s, Tuner.fit to the first trial's start (worker "
               "processes, imports); setup_s, building models (summed over trials, counted /slots); checkpoint_s, "
               "checkpoints the trials reported (a trial's last one is in other_s); round_trip_ms, per epoch, the "
               "driver's receipt gap minus the epoch's work and checkpoint; tail_idle_s, slots idle at the end "
               "waiting for the last trial; teardown_s, last trial's end to fit's return; other_s, the rest "
               "(trial starts and ends)")


if __name__ == "__main__":
    main()
