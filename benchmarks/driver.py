"""The driver's cost per trial as sweeps grow: N trials that train almost nothing (d 16, one epoch
on the tiny set, `search_spaces/bench/overhead-empty.yaml`), many at a time on Ray's logical CPUs
(more slots than this machine's cores: the workers wait on the driver, not on arithmetic).

Each N runs in a process of its own, which is the sweep's driver, and reports:
- fit_s and fit_per_trial_ms: Tuner.fit's wall time, over N;
- driver_cpu_per_trial_ms: the driver process's own CPU time (user + system) over N, what its
  callbacks, tables, searcher and MLflow writer cost, whatever the workers do;
- peak_rss_mb: the driver's peak resident memory;
- written_mb and written_per_trial_kb: bytes the driver process wrote to disk (/proc/self/io), and
  of them what its MLflow writer thread wrote (mlflow_writer_per_trial_kb: with the default local
  sqlite store, the store's own pages and journal) and the rest (rest_per_trial_kb: Tune's
  snapshots, the study, the tables, the journal, the ended records);
- mlflow_calls_per_trial: MlflowClient calls the driver made, over N.

With `--memory-between A,B` the driver also traces its Python allocations (tracemalloc, which
slows it: its CPU and wall figures are then not comparable) and reports what grew between the
A-th and the B-th ended trial, per trial and by the file that allocated it (memory_by_file_kb).

With `--nodes K` every N runs on a Ray cluster of K raylets on this machine (a head and K - 1
worker nodes started with `ray start`, the slots shared out among them), which the driver joins
by address, as it would a multi-node cluster.

It also times what a sweep's own tables cost the driver once trials have many epochs (which the
one-epoch trials above do not show): one rewrite of trials.parquet and history.parquet at N
trials of E epochs, its size, how many rewrites a sweep of N trials made at every trial start and
end (2N), and how long hpo.table now waits after such a write (wait_after_s: TABLE_PERIOD_S, or 19
times the write's time, or the tables' size over TABLE_BYTES_PER_S, the longest).

    python -m benchmarks driver [--trials 100,300,1000] [--slots 8] [--nodes 1] [--table-epochs 60]
                                [--memory-between 80,232] [--quick]
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import resource
import shutil
import time
from pathlib import Path

from .common import emit_point, local_cluster, parser, peak_rss_mb, run_point, save, synthetic_dataset, table

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "bench" / "overhead-empty.yaml"
COLUMNS = ["trials", "nodes_seen", "slots", "fit_s", "fit_per_trial_ms", "driver_cpu_per_trial_ms", "peak_rss_mb",
           "written_mb", "written_per_trial_kb", "mlflow_writer_per_trial_kb", "rest_per_trial_kb",
           "mlflow_calls_per_trial", "completed"]
TABLE_COLUMNS = ["trials", "epochs", "write_ms", "size_mb", "wait_after_s", "rewrites_per_event",
                 "est_seconds_at_every_event"]


def count_mlflow_calls() -> dict[str, int]:
    """Count every public MlflowClient method call made in this process from now on."""
    from mlflow.tracking import MlflowClient

    counts: dict[str, int] = {}

    def counted(name, method):
        @functools.wraps(method)
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return method(*args, **kwargs)
        return call

    for name in dir(MlflowClient):
        method = getattr(MlflowClient, name)
        if not name.startswith("_") and callable(method):
            setattr(MlflowClient, name, counted(name, method))
    return counts


def written_bytes(task: str = "self") -> int:
    """Bytes this process (or, with task="thread-self", the calling thread) sent to storage."""
    for line in Path(f"/proc/{task}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def count_mlflow_writer_bytes() -> list[int]:
    """Bytes written by the sweep's MLflow writer threads (with a local sqlite store, the store's
    own writes: its pages and rollback journal), added up as each thread ends."""
    from hpo.tracking import MlflowWriter

    written, run = [0], MlflowWriter._run

    @functools.wraps(run)
    def counted(self):
        try:
            run(self)
        finally:
            written[0] += written_bytes("thread-self")

    MlflowWriter._run = counted
    return written


def trace_memory_between(first: int, last: int) -> dict:
    """Trace the driver's Python allocations from now, and snapshot them when the `first`-th and
    the `last`-th trial end (a Tune callback added to the sweep's own); returns the dict that
    `memory_growth` reads once the sweep is over."""
    import tracemalloc

    from ray.tune import Callback

    import hpo.tuner

    state: dict = {"ended": 0}

    class _Snapshots(Callback):
        def _ended(self) -> None:
            state["ended"] += 1
            if state["ended"] in (first, last):
                state[state["ended"]] = tracemalloc.take_snapshot()

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._ended()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended()

    build = hpo.tuner.sweep_callbacks

    @functools.wraps(build)
    def with_snapshots(*args, **kwargs):
        return [*build(*args, **kwargs), _Snapshots()]

    hpo.tuner.sweep_callbacks = with_snapshots
    tracemalloc.start(1)
    state["span"] = (first, last)
    return state


def memory_growth(state: dict, top: int = 12) -> dict[str, float]:
    """KB per ended trial that each allocating file added between the two snapshots (the `top`
    largest, then the rest and the total)."""
    first, last = state["span"]
    if first not in state or last not in state:
        return {}
    diff = state[last].compare_to(state[first], "filename")
    per_trial = {stat.traceback[0].filename.split("site-packages/")[-1]: stat.size_diff / 1e3 / (last - first)
                 for stat in diff}
    ranked = sorted(per_trial.items(), key=lambda kv: -kv[1])
    return {**dict(ranked[:top]), "(the rest)": sum(v for _, v in ranked[top:]),
            "(total)": sum(per_trial.values())}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def point(trials: int, slots: int, work: str, data: str, nodes: int = 1, memory_between: list | None = None) -> dict:
    """One sweep of `trials` trials in this process (the driver), measured; on the cluster that
    RAY_ADDRESS names if set, else on a private local Ray of `slots` CPUs."""

    from hpo.sweep import SweepOptions, run_sweep

    traced = trace_memory_between(*memory_between) if memory_between else None

    calls, lines, by_mlflow = count_mlflow_calls(), [], count_mlflow_writer_bytes()
    written, cpu = written_bytes(), cpu_seconds()
    outcome = run_sweep(SweepOptions(space=SPACE, data=data, num_samples=trials, max_concurrent=slots,
                                     cpus_per_trial=1, num_cpus=None if os.environ.get("RAY_ADDRESS") else slots,
                                     results=work, name=f"driver-{nodes}x{trials}",
                                     command=f"benchmarks.driver {trials}"), log=lines.append)
    cpu, written = cpu_seconds() - cpu, written_bytes() - written
    joined = re.search(r"checked on (\d+) nodes", "\n".join(lines))  # the preflight ran on every node it found
    return dict(trials=trials, nodes=nodes, nodes_seen=int(joined.group(1)) if joined else 1, slots=slots,
                fit_s=outcome.fit_seconds, fit_per_trial_ms=1000 * outcome.fit_seconds / trials,
                driver_cpu_per_trial_ms=1000 * cpu / trials, peak_rss_mb=peak_rss_mb(),
                written_mb=written / 1e6, written_per_trial_kb=written / 1e3 / trials,
                mlflow_writer_per_trial_kb=by_mlflow[0] / 1e3 / trials,
                rest_per_trial_kb=(written - by_mlflow[0]) / 1e3 / trials,
                mlflow_calls_per_trial=sum(calls.values()) / trials, mlflow_calls=calls,
                completed=outcome.counts["completed"] + outcome.counts["stopped_by_asha"],
                memory_by_file_kb=memory_growth(traced) if traced else None)


def table_write(trials: int, epochs: int, work: Path) -> dict:
    """One rewrite of the sweep's tables holding `trials` trials of `epochs` epochs each."""
    from ray.tune.experiment import Trial

    from hpo.table import HISTORY_FILE, TABLE_PERIOD_S, TRIALS_FILE, TrialTable, wait_after_write

    folder = work / f"table-{trials}x{epochs}"
    folder.mkdir(parents=True, exist_ok=True)
    table = TrialTable(folder, base={"epochs": epochs}, searched=["lr"], period=float("inf"))
    scores = {"val_wf1": 0.5, "val_acc": 0.5, "test_wf1": 0.4, "test_acc": 0.4, "train_loss": 1.0,
              "epoch_seconds": 1.0, **{f"val_f1_{c}": 0.5 for c in range(6)}, **{f"test_f1_{c}": 0.4 for c in range(6)}}
    for n in range(trials):
        trial = Trial("CMATHTrial", config={"lr": 1e-3}, trial_id=f"{n:08x}", stub=True)
        table.row(trial, number=n)
        for epoch in range(1, epochs + 1):
            table.on_trial_result(0, [], trial, {"epoch": epoch, **scores})
    started = time.perf_counter()
    table.write()
    seconds = time.perf_counter() - started
    size = sum((folder / name).stat().st_size for name in (TRIALS_FILE, HISTORY_FILE))
    shutil.rmtree(folder, ignore_errors=True)
    return dict(trials=trials, epochs=epochs, write_ms=1000 * seconds, size_mb=size / 1e6,
                wait_after_s=max(TABLE_PERIOD_S, wait_after_write(seconds, size)), rewrites_per_event=2 * trials,
                est_seconds_at_every_event=2 * trials * seconds / 2)  # the average table is half the final one


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--trials", default="100,300,1000", help="sweep sizes, comma-separated")
    p.add_argument("--slots", type=int, default=8, help="trials at a time (Ray's logical CPUs)")
    p.add_argument("--nodes", type=int, default=1,
                   help="raylets: 1 is a private local Ray; K > 1 starts a head and K - 1 worker nodes here")
    p.add_argument("--keep", action="store_true", help="keep the sweeps' folders (under <out>/work/)")
    p.add_argument("--table-epochs", type=int, default=60, help="epochs per trial for the table rewrite timing")
    p.add_argument("--memory-between", default=None,
                   help="A,B: what the driver's Python objects grew by between the A-th and B-th ended trial")
    args = p.parse_args(argv)
    if args.point:
        import json

        emit_point(point(**json.loads(args.point)))
        return
    sizes = [20, 60] if args.quick else [int(n) for n in args.trials.split(",")]
    data = str(synthetic_dataset(args.data_dir, "tiny"))
    work = Path(args.out).resolve() / "work" / f"driver-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = []
    try:
        with local_cluster(args.nodes, args.slots) if args.nodes > 1 else contextlib.nullcontext({}) as joining:
            for n in sizes:
                print(f"driver: {n} trials, {args.slots} at a time on {args.nodes} node(s)", flush=True)
                span = [int(v) for v in args.memory_between.split(",")] if args.memory_between else None
                rows.append(run_point("driver", dict(trials=n, slots=args.slots, work=str(work), data=data,
                                                     nodes=args.nodes, memory_between=span), env=joining,
                                      timeout=max(3600, 2 * n)))  # 10,000 trials take over an hour here
                print(f"  fit {rows[-1]['fit_s']:.0f}s, driver CPU {rows[-1]['driver_cpu_per_trial_ms']:.0f} "
                      f"ms/trial", flush=True)
                for where, kb in (rows[-1].get("memory_by_file_kb") or {}).items():
                    print(f"  {kb:8.1f} KB a trial  {where}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    base = rows[0]
    for row in rows:
        row["driver_cpu_vs_first"] = row["driver_cpu_per_trial_ms"] / base["driver_cpu_per_trial_ms"]
    tables = [table_write(n, args.table_epochs, work) for n in sizes]
    print(table(tables, TABLE_COLUMNS))
    name = "driver" if args.nodes == 1 else f"driver-{args.nodes}nodes"
    save(name, args, rows, COLUMNS + ["driver_cpu_vs_first"], tables=tables,
         goal="driver time per trial at N=1000 within 1.25x of N=100; memory no faster than linear",
         notes="Empty trials (d 16, 1 epoch on tiny); each N in its own driver process; slots are Ray logical CPUs "
               f"on this machine's cores, on {args.nodes} raylet(s). driver_cpu is the driver process's user+system "
               "CPU seconds during the sweep; written is /proc/self/io write_bytes of the driver (tables, journal, "
               "sqlite stores, Tune's experiment snapshots); MLflow calls counted by wrapping MlflowClient's public "
               "methods.")


if __name__ == "__main__":
    main()
