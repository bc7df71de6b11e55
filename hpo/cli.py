"""`cmath-hpo`: sweep, resume, export-best, report, ui, bench. Thin argument parsing over hpo's library functions."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from cmath_model.cli import CommandLine, _parse_set, _run
from cmath_model.errors import command

from .errors import SweepError


def _parser() -> argparse.ArgumentParser:
    parser = CommandLine(prog="cmath-hpo", description="CMATH hyperparameter sweeps "
                                     "(Ray Tune + Optuna TPE + ASHA, tracked in MLflow).")
    sub = parser.add_subparsers(dest="command", required=True)

    sweep = sub.add_parser("sweep", help="run a sweep")
    sweep.add_argument("--space", required=True, help="search-space YAML (see search_spaces/)")
    sweep.add_argument("--data", help="canonical Parquet dataset (default: built-in synthetic `small` set)")
    sweep.add_argument("--num-samples", type=int, default=8, help="trials to run")
    sweep.add_argument("--max-concurrent", type=int,
                       help="trials at a time (default: the cluster's slots, at most a quarter of --num-samples)")
    sweep.add_argument("--cpus-per-trial", type=float, default=1.0)
    sweep.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractions pack trials: 0.25 = 4 per GPU")
    sweep.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else a private local Ray)")
    sweep.add_argument("--allow-open-cluster", action="store_true",
                       help="join a cluster that runs without token authentication (refused by default: anyone "
                            "who reaches it can run code on its nodes)")
    sweep.add_argument("--num-cpus", type=int, help="CPUs the private local Ray may use (default: all)")
    sweep.add_argument("--mlflow-uri", help="tracking URI (default: sqlite:///<results>/mlflow.db)")
    sweep.add_argument("--experiment", help="MLflow experiment (default: the sweep name)")
    sweep.add_argument("--results", default="results")
    sweep.add_argument("--name", help="sweep name (default: space name + timestamp)")
    sweep.add_argument("--storage", help="shared path or URI for Ray's trial folders, checkpoints, the study and a "
                                         "mirror of the sweep's records, so any host can resume it "
                                         "(default: <results>/<name>/ray)")
    sweep.add_argument("--study-storage", metavar="URL",
                       help="an Optuna database URL for the study, e.g. postgresql://user@host/db (default: "
                            "a journal beside Ray's experiment, copied into the sweep's optuna.db when it stops)")
    sweep.add_argument("--time-budget", type=float, help="stop starting and running trials after this many seconds")
    sweep.add_argument("--wait-for-resources", type=float, default=0.0, metavar="SEC",
                       help="on an autoscaling cluster: ask for a node that fits a trial and wait up to SEC "
                            "seconds for it, instead of refusing at once")
    sweep.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="fix config fields, e.g. epochs=5")
    sweep.add_argument("--dry-run", action="store_true", help="print the plan and the first configs; start nothing")
    sweep.add_argument("--verbose", action="store_true", help="print every epoch of every trial")
    sweep.add_argument("--max-retries", type=int, default=2,
                       help="restarts from the last checkpoint when a trial's worker or node is lost (default 2)")
    sweep.add_argument("--sampler", choices=("tpe", "random"), default="tpe",
                       help="tpe (default: seeded random start-up, then TPE) or random search throughout")
    sweep.add_argument("--no-early-stopping", action="store_true", help="no ASHA: every trial runs all its epochs")
    sweep.add_argument("--seed", type=int, help="the sampler's seed (default: the space's seed)")
    sweep.add_argument("--keep-checkpoints", action="store_true",
                       help="keep ended trials' resume state (by default only their best weights stay)")

    resume = sub.add_parser("resume", help="continue an interrupted or killed sweep")
    resume.add_argument("sweep", help="a sweep folder, a sweep name under --results, latest, or the sweep's "
                                      "folder on its shared storage (<--storage>/<name>: from any host)")
    resume.add_argument("--results", default="results")
    resume.add_argument("--mlflow-uri", help="the sweep's tracking store, served from another address")
    resume.add_argument("--data", help="the sweep's dataset, moved (its SHA-256 must match)")
    resume.add_argument("--study-storage", metavar="URL", help="the sweep's study database, given again (a password "
                                                               "in its URL is not recorded)")
    resume.add_argument("--storage", help="the sweep's storage, given again (credentials in its URI are not "
                                          "recorded) or as this host reaches it")
    resume.add_argument("--address", help="join this Ray cluster instead of the one the sweep used")
    resume.add_argument("--allow-open-cluster", action="store_true",
                        help="join a cluster that runs without token authentication")
    resume.add_argument("--driver-gone", action="store_true",
                        help="the sweep's driver ran on another host and is gone: resume without checking it")

    export = sub.add_parser("export-best", help="write the best trial's training config")
    export.add_argument("sweep", help="a sweep folder, a sweep name under --results, or latest")
    export.add_argument("-o", "--output", required=True)
    export.add_argument("--results", default="results")
    export.add_argument("--top", type=int, metavar="K",
                        help="first train the K best trials again over --seeds new seeds each (on Ray) and pick "
                             "the best mean validation score (default with --seeds: 3)")
    export.add_argument("--seeds", type=int, metavar="N", help="seeds per re-scored trial (default with --top: 3)")
    export.add_argument("--address", help="re-score on this Ray cluster (default: RAY_ADDRESS, else a private "
                                          "local Ray)")
    export.add_argument("--num-cpus", type=int, help="CPUs the private local Ray may use (default: all)")
    export.add_argument("--allow-open-cluster", action="store_true",
                        help="re-score on a cluster that runs without token authentication")
    export.add_argument("--mlflow-uri", help="the sweep's tracking store for the re-scoring runs, if not the "
                                             "recorded one (e.g. with its secret, which is not recorded)")

    report = sub.add_parser("report", help="plots and report.md from a sweep (also logged to its MLflow parent run)")
    report.add_argument("sweep", help="a sweep folder, a sweep name under --results, or latest")
    report.add_argument("--results", default="results")
    report.add_argument("--no-mlflow", action="store_true", help="do not log the report to the sweep's parent run")
    report.add_argument("--mlflow-uri", help="the sweep's tracking store, if not the recorded one (e.g. with its "
                                             "secret, which is not recorded)")

    bench = sub.add_parser("bench", help="run a benchmark of this source checkout (python -m benchmarks NAME): "
                                         "prints a table, writes results/benchmarks/NAME.json", add_help=False)
    bench.add_argument("name", help="overhead, speed, epoch, gpu, search, packing, meld, footing, scaling, driver "
                                    "or all")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options, e.g. --quick")

    ui = sub.add_parser("ui", help="open the MLflow UI on the sweep store")
    ui.add_argument("--results", default="results")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    ui.add_argument("--mlflow-uri", help="a store other than <results>/mlflow.db")
    return parser


def _sweep(args: argparse.Namespace) -> int:
    from .plan import SweepOptions, describe_plan, plan_sweep
    from .sweep import run_sweep

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store set-up chatter, not our progress

    options = SweepOptions(
        space=args.space, data=args.data, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, address=args.address,
        num_cpus=args.num_cpus, mlflow_uri=args.mlflow_uri, experiment=args.experiment, results=args.results,
        name=args.name, storage=args.storage, study_storage=args.study_storage, time_budget=args.time_budget,
        wait_for_resources=args.wait_for_resources, allow_open_cluster=args.allow_open_cluster,
        overrides=_parse_set(args.set),
        verbose=args.verbose, keep_checkpoints=args.keep_checkpoints, max_retries=args.max_retries,
        sampler=args.sampler, early_stopping=not args.no_early_stopping, seed=args.seed,
        command=shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]]))
    if args.dry_run:
        print(describe_plan(plan_sweep(options)))
        print("dry run: nothing started")
        return 0
    return run_sweep(options).exit_code


def _resume(args: argparse.Namespace) -> int:
    from .resume import resume_sweep

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return resume_sweep(args.sweep, args.results, address=args.address, driver_gone=args.driver_gone,
                        allow_open_cluster=args.allow_open_cluster, mlflow_uri=args.mlflow_uri,
                        data=args.data, study_storage=args.study_storage, storage=args.storage).exit_code


def _export(args: argparse.Namespace) -> int:
    from .export import close_to_best, export_best
    from .record import find_sweep, read_rescore

    sweep_dir = find_sweep(args.sweep, args.results)
    if args.top is not None or args.seeds is not None:
        from .rescore import rescore_best

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        rescore_best(sweep_dir, top=3 if args.top is None else args.top,
                     seeds=3 if args.seeds is None else args.seeds, address=args.address, num_cpus=args.num_cpus,
                     allow_open_cluster=args.allow_open_cluster, mlflow_uri=args.mlflow_uri)
    values = export_best(sweep_dir, args.output, args.results)
    p = values["provenance"]
    rescored = read_rescore(sweep_dir)
    if rescored is not None:
        from .rescore import describe

        print(describe(rescored))
        r = p["rescore"]
        print(f"picked trial {p['trial_id']} of {p['sweep']}: val W-F1 {100 * r['best_val_wf1_mean']:.2f} mean "
              f"over seeds {r['seeds']}, {values['epochs']} epochs")
    else:
        print(f"best trial {p['trial_id']} of {p['sweep']}: val W-F1 {100 * p['best_val_wf1']:.2f} at epoch "
              f"{p['best_epoch']}")
        close = close_to_best(sweep_dir, args.results)
        if close:
            print(f"{close} other trial{'s' if close > 1 else ''} ended within 1 point of it: one seed each "
                  f"cannot rank them; --top {min(close + 1, 5)} --seeds 3 re-scores them before picking")
    print(f"wrote {args.output}; retrain it with: {command('cmath-train')} --config {args.output} --seeds 5")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import make_report

    out = make_report(args.sweep, args.results, log_to_mlflow=not args.no_mlflow, mlflow_uri=args.mlflow_uri)
    print(f"wrote {out / 'report.md'} and its plots in {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """`python -m benchmarks` in a child process: the benchmarks import hpo, never the reverse, and
    live in the source checkout beside this package, not in the installed one."""
    import os
    import subprocess

    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "benchmarks" / "__main__.py").exists():
        raise SweepError(f"bench: no benchmarks/ beside {checkout / 'hpo'}; the benchmarks run from a source "
                         f"checkout of cmath-hpo (pip install -e . there, then cmath-hpo bench NAME)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}
    return subprocess.call([sys.executable, "-m", "benchmarks", args.name, *args.rest], env=env)


def _ui(args: argparse.Namespace) -> int:
    from .ui import serve_until_stopped, start_ui, sweep_links

    process, url = start_ui(args.results, args.port, args.host, args.mlflow_uri)
    print(f"MLflow UI: {url}  (pid {process.pid}; Ctrl-C stops it)", flush=True)
    links = sweep_links(url, args.results)
    if links:
        print("each sweep's runs (MLflow opens an experiment in its GenAI view otherwise; its \"Model training\" "
              "switch shows them too):\n" + "\n".join(links), flush=True)
    serve_until_stopped(process)
    return 0


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also in a log file
    def dispatch(argv: list[str] | None) -> int:
        args = _parser().parse_args(argv)
        return {"sweep": _sweep, "resume": _resume, "export-best": _export, "report": _report,
                "ui": _ui, "bench": _bench}[args.command](args)

    return _run(dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
