"""A real sweep: a private local Ray (2 CPUs), Optuna, ASHA and a sqlite MLflow store on tiny data.

One sweep (module fixture) is checked from every side: MLflow runs and artifacts, the Optuna
study, trials.parquet, export-best and retraining, and the MLflow UI's REST API.
"""

import json
import shutil
import subprocess
import sys
import time
import urllib.request
import warnings

import numpy as np
import optuna
import pandas as pd
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from cmath_model.cli import train_main
from cmath_model.config import from_dict, load_config
from cmath_model.runs import evaluate_checkpoint
from cmath_model.tracking import default_tracking_uri
from cmath_model.train import train
from hpo.cli import main as hpo_main
from hpo.errors import SweepError
from hpo.export import export_best
from hpo.plan import asha_rungs, first_configs, plan_sweep
from hpo.record import RESCORE_TABLE, find_sweep
from hpo.rescore import SEED_OFFSET, rescore_best
from hpo.sweep import SweepOptions, run_sweep
from hpo.trainable import SCHEDULING_KEYS, CMATHTrial
from hpo.trials import HISTORY_FILE, read_trials, records
from hpo.ui import start_ui, stop_ui, sweep_links

EPOCHS = 4
SAMPLES = 6
WARM = {"d": 64, "gamma1": 1.0, "gamma2": 1.8, "lr": 1.0e-3}
SPACE = {
    "name": "tiny",
    "dataset": "iemocap",
    "seed": 0,
    "search": {"d": {"type": "int", "low": 32, "high": 96, "step": 16},
               "gamma1": {"type": "float", "low": 0.0, "high": 3.0},
               "gamma2": {"type": "float", "low": 0.0, "high": 3.0},
               "lr": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2}},
    "fixed": {"epochs": EPOCHS, "batch_size": 4, "checkpoint_every": 2},
    "warm_start": [WARM],
    "asha": {"grace_period": 1, "reduction_factor": 2},
}


@pytest.fixture(scope="module")
def space_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("space") / "tiny.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_path, space_path, shared_ray):
    results = tmp_path_factory.mktemp("results")
    # No --max-concurrent: the sweep sizes it, as a user's does (2 slots, at most ceil(6 / 4) = 2).
    options = SweepOptions(space=space_path, data=str(tiny_path), num_samples=SAMPLES, cpus_per_trial=1,
                           num_cpus=2, results=results, name="s1")
    lines = []
    outcome = run_sweep(options, log=lines.append)
    client = MlflowClient(default_tracking_uri(results))
    experiment = client.get_experiment_by_name("s1")
    runs = client.search_runs([experiment.experiment_id])
    return {"outcome": outcome, "results": results, "dir": results / "s1", "client": client, "runs": runs,
            "trials": read_trials(results / "s1"), "lines": lines}


def test_dry_run_prints_the_plan_and_starts_nothing(space_path, tiny_path, tmp_path, capsys):
    """First in this module: before its sweep starts this process's Ray."""
    assert not ray.is_initialized()
    code = hpo_main(["sweep", "--space", str(space_path), "--data", str(tiny_path), "--num-samples", "6",
                     "--max-concurrent", "2", "--results", str(tmp_path), "--name", "dry", "--dry-run"])
    assert code == 0
    out = capsys.readouterr().out
    assert "1. d=64  gamma1=1  gamma2=1.8  lr=0.001" in out  # the warm start comes first
    assert "search lr: float [0.0001, 0.01] (log)" in out and "dry run: nothing started" in out
    assert not ray.is_initialized()
    assert not (tmp_path / "dry").exists() and not (tmp_path / "mlflow.db").exists()


def test_sweep_runs_every_trial_and_prints_the_best(sweep):
    outcome, trials = sweep["outcome"], sweep["trials"]
    assert outcome.status == "finished"
    assert len(trials) == SAMPLES and set(trials["end_state"]) <= {"completed", "stopped_by_asha"}
    assert outcome.counts["completed"] + outcome.counts["stopped_by_asha"] == SAMPLES
    assert outcome.best["trial_id"] == trials.loc[trials["best_val_wf1"].idxmax(), "trial_id"]
    text = "\n".join(sweep["lines"])
    assert f"best trial {outcome.best['trial_id']}" in text and str(sweep["dir"]) in text
    assert sum(line.count("] start (") for line in sweep["lines"]) == SAMPLES
    record = json.loads((sweep["dir"] / "sweep.json").read_text())
    assert record["data"]["sha256"] == trials.pipe(lambda t: json.loads(t["config"][0])["data_sha256"])
    installed = {"ray": ray.__version__, "optuna": optuna.__version__, "pandas": pd.__version__,
                 "numpy": np.__version__}
    assert {name: record["versions"][name] for name in installed} == installed
    assert record["seeds"] == {"sampler": 0, "trial": 0}
    assert record["status"] == "finished" and record["counts"]["failed"] == 0


def test_warm_start_is_the_first_trial(sweep):
    first = sweep["trials"].sort_values("number").iloc[0]
    assert {k: first[f"param_{k}"] for k in WARM} == pytest.approx(WARM)
    assert first["suggested_by"] == "warm_start"
    # the random start-up leaves at least half of the budget to TPE
    assert (sweep["trials"]["suggested_by"] == "tpe").sum() >= SAMPLES / 2


def test_completed_trials_ran_every_epoch_and_stopped_ones_fewer(sweep):
    trials = sweep["trials"]
    assert (trials.loc[trials["end_state"] == "completed", "epochs"] == EPOCHS).all()
    assert (trials.loc[trials["end_state"] == "stopped_by_asha", "epochs"] < EPOCHS).all()
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{sweep['dir'] / 'optuna.db'}")
    state = {t.user_attrs["ray_trial_id"]: t.state.name for t in study.trials}
    assert {state[t] for t in trials.loc[trials["end_state"] == "completed", "trial_id"]} == {"COMPLETE"}


class RankedByLearningRate(CMATHTrial):
    """Reports val_wf1 = lr / 0.01 (ASHA's metric), so the trials' order is known in advance."""

    def _epoch(self) -> dict:
        return {**super()._epoch(), "val_wf1": self.cmath_config.lr / 0.01}


# Ray's workers cannot import the tests folder: ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_asha_stops_a_trial_below_its_rungs_median_and_prunes_it_in_the_study(tmp_path, tiny_path, shared_ray):
    """Four warm-start trials, each worse than the one before, two at a time. Ray's ASHA stops a
    trial whose result at a rung is below the median of those recorded there: trials 2 and 3
    start only once trial 0 or 1 has ended, past rung 1, so they are stopped there, for certain;
    trial 0, the best everywhere, never is."""
    lrs = [4e-3, 3e-3, 2e-3, 1e-3]
    space = tmp_path / "ranked.yaml"
    space.write_text(yaml.safe_dump({"dataset": "iemocap", "search": {"lr": {"type": "loguniform", "low": 1e-4,
                                                                              "high": 1e-2}},
                                     "fixed": {"d": 16, "epochs": 3, "batch_size": 8, "checkpoint_every": 0},
                                     "warm_start": [{"lr": lr} for lr in lrs],
                                     "asha": {"grace_period": 1, "reduction_factor": 2}}))
    outcome = run_sweep(SweepOptions(space=space, data=str(tiny_path), num_samples=4, max_concurrent=2, num_cpus=2,
                                     results=tmp_path, name="ranked"),
                        log=lambda line: None, trainable=RankedByLearningRate)
    trials = read_trials(tmp_path / "ranked").set_index("number")
    assert list(trials["param_lr"]) == pytest.approx(lrs)
    assert list(trials.loc[[2, 3], "end_state"]) == ["stopped_by_asha"] * 2
    assert list(trials.loc[[2, 3], "epochs"]) == [1, 1]
    assert trials.loc[0, "end_state"] == "completed" and trials.loc[0, "epochs"] == 3
    assert outcome.best["trial_id"] == trials.loc[0, "trial_id"]
    study = optuna.load_study(study_name="ranked", storage=f"sqlite:///{tmp_path / 'ranked' / 'optuna.db'}")
    state = {t.number: t.state.name for t in study.trials}
    assert [state[n] for n in (0, 2, 3)] == ["COMPLETE", "PRUNED", "PRUNED"]
    assert state[1] == ("PRUNED" if trials.loc[1, "end_state"] == "stopped_by_asha" else "COMPLETE")


def test_mlflow_has_one_parent_and_one_child_per_trial(sweep):
    runs, trials = sweep["runs"], sweep["trials"]
    parents = [r for r in runs if r.data.tags.get("cmath.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("cmath.kind") == "trial"]
    assert len(parents) == 1 and len(children) == SAMPLES
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["num_samples"] == str(SAMPLES)
    assert parent.data.tags["cmath.best_trial_id"] == sweep["outcome"].best["trial_id"]
    by_trial = {r.data.tags["cmath.trial_id"]: r for r in children}
    assert set(by_trial) == set(trials["trial_id"])
    assert set(trials["mlflow_run_id"]) == {r.info.run_id for r in children}
    for row in trials.itertuples():
        run = by_trial[row.trial_id]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["cmath.sweep"] == "s1"
        assert run.data.tags["cmath.end_state"] == row.end_state and run.info.status == "FINISHED"
        for key in WARM:
            assert float(run.data.params[key]) == pytest.approx(getattr(row, f"param_{key}"))
        # a name a person can read: number, score, how it ended unless completed, values; the best marked
        mark = "★ " if row.trial_id == sweep["outcome"].best["trial_id"] else ""
        ended = {"completed": "", "stopped_by_asha": "  stopped by ASHA"}[row.end_state]
        values = "  ".join([f"d={int(row.param_d)} gamma1={row.param_gamma1:.3g} gamma2={row.param_gamma2:.3g} "
                            f"lr={row.param_lr:.3g}"])
        assert run.info.run_name == f"{mark}#{row.number}  W-F1 {100 * row.best_val_wf1:.2f}%{ended}  {values}"


def test_metric_history_matches_the_table(sweep):
    client, trials = sweep["client"], sweep["trials"]
    history = pd.read_parquet(sweep["dir"] / HISTORY_FILE)
    for row in trials.itertuples():
        logged = client.get_metric_history(row.mlflow_run_id, "val_wf1")
        assert [m.step for m in logged] == list(range(1, row.epochs + 1))
        assert max(m.value for m in logged) == pytest.approx(row.best_val_wf1)
        mine = history[history["trial_id"] == row.trial_id].sort_values("epoch")
        assert list(mine["val_wf1"]) == pytest.approx([m.value for m in logged])
    run = client.get_run(trials["mlflow_run_id"][0])
    assert "test_wf1" in run.data.metrics and "loss_kl" in run.data.metrics
    assert not {"pid", "done", "timestamp", "training_iteration"} & set(run.data.metrics)


def test_tune_keeps_statistics_only_of_what_it_schedules_on(sweep):
    """Tune keeps running statistics of every numeric key of a result in each trial's state, which
    every experiment snapshot rewrites for every trial: results carry as numbers only what Tune
    schedules on, an ended trial keeps the statistics of the metric alone, and the per-class
    F1s, losses and timings reach the journal, the tables and MLflow all the same."""
    state = json.loads(max((sweep["dir"] / "ray").glob("experiment_state-*.json")).read_text())
    tunes_own = {"training_iteration", "time_this_iter_s", "time_total_s", "time_since_restore",
                 "iterations_since_restore", "timestamp", "pid"}
    assert len(state["trial_data"]) == SAMPLES
    for trial, metadata in state["trial_data"]:
        assert json.loads(trial)["status"] == "TERMINATED"
        metadata = json.loads(metadata)
        numbers = {k for k, v in metadata["last_result"].items() if isinstance(v, (int, float))}
        assert "val_wf1" in numbers
        assert numbers <= {*SCHEDULING_KEYS, "epochs_planned", "should_checkpoint", "done", *tunes_own}, numbers
        assert set(metadata["metric_analysis"]) == set(metadata["metric_n_steps"]) == {"val_wf1"}
    history = pd.read_parquet(sweep["dir"] / HISTORY_FILE)
    details = [c for c in history.columns if c.startswith(("val_f1_", "test_f1_", "loss_"))] + ["epoch_seconds"]
    assert len(details) >= 10 and history[details].notna().all().all()
    run = sweep["client"].get_run(sweep["trials"]["mlflow_run_id"][0])
    assert set(details) <= set(run.data.metrics)


def test_checkpoint_artifact_loads_and_reproduces_its_score(sweep, tmp_path):
    client = sweep["client"]
    row = sweep["trials"].sort_values("best_val_wf1").iloc[-1]
    names = {a.path for a in client.list_artifacts(row["mlflow_run_id"], "best")}
    assert {"best/model.pt", "best/config.yaml", "best/test_predictions.npz", "best/metrics.json"} <= names
    local = client.download_artifacts(row["mlflow_run_id"], "best", str(tmp_path))
    metrics = evaluate_checkpoint(local)
    assert metrics["test_wf1"] == pytest.approx(row["test_wf1_at_best_val"], abs=1e-9)
    predictions = np.load(f"{local}/test_predictions.npz")
    assert len(predictions["pred"]) == metrics["num_utterances"]


def test_ended_trials_keep_only_their_latest_best_checkpoint(sweep):
    for row in sweep["trials"].itertuples():
        best = sweep["dir"] / "ray" / row.checkpoint.split("/ray/", 1)[1]
        trial_dir = best.parent.parent
        assert [p.name for p in trial_dir.glob("checkpoint_*")] == [best.parent.name]
        assert (best / "model.pt").exists() and not (best.parent / "trainer").exists()


def test_each_checkpoint_is_on_disk_once(sweep):
    """The local MLflow store's copy of a trial's weights is the sweep folder's file under a
    second name (a hard link), not a second copy on the same disk."""
    from cmath_model.tracking import local_artifact_dir

    for row in sweep["trials"].itertuples():
        in_sweep = sweep["dir"] / "ray" / row.checkpoint.split("/ray/", 1)[1] / "model.pt"
        artifacts = local_artifact_dir(sweep["client"].get_run(row.mlflow_run_id).info.artifact_uri)
        in_mlflow = artifacts / "best" / "model.pt"
        assert in_mlflow.stat().st_ino == in_sweep.stat().st_ino, row.trial_id
        assert in_mlflow.read_bytes() == in_sweep.read_bytes()


def test_trials_checkpoint_where_asha_may_stop_them_and_at_their_end(sweep):
    """Checkpoints are written at ASHA's rungs and the last epoch (and every checkpoint_every),
    not at every improvement; a finished trial's last one records its result, not resume state."""
    from hpo._compat import asha_bracket, bracket_rungs

    asha = SPACE["asha"]
    rungs = asha_rungs(asha["grace_period"], asha["reduction_factor"], EPOCHS)
    bracket = asha_bracket(asha["grace_period"], EPOCHS, asha["reduction_factor"])
    assert rungs == tuple(sorted(m for m, _ in bracket_rungs(bracket)))
    assert tuple(json.loads((sweep["dir"] / "sweep.json").read_text())["asha"]["rungs"]) == rungs
    assert asha_rungs(5, 3, 60) == (5, 15, 45) and asha_rungs(10, 2, 20) == (10, 20)
    for row in sweep["trials"].itertuples():
        checkpoint = sweep["dir"] / "ray" / row.checkpoint.split("/ray/", 1)[1].rsplit("/", 1)[0]
        info = json.loads((checkpoint / "checkpoint.json").read_text())
        assert info["epoch"] == row.epochs
        if row.end_state == "completed":
            assert info["final"] and info["result"]["epoch"] == EPOCHS
            assert info["result"]["best_epoch"] == row.best_epoch
        else:
            assert row.epochs in rungs and not info["final"]
        metrics = json.loads((checkpoint / "best" / "metrics.json").read_text())
        assert metrics["epoch"] == row.best_epoch and metrics["val_wf1"] == pytest.approx(row.best_val_wf1)


@pytest.mark.slow
def test_random_search_without_early_stopping(space_path, tiny_path, tmp_path, shared_ray):
    """The baseline benchmarks.search measures TPE + ASHA against: every trial runs all its epochs.
    With --verbose every epoch is a line; with --keep-checkpoints ended trials keep their resume state."""
    options = SweepOptions(space=space_path, data=str(tiny_path), num_samples=4, max_concurrent=2, num_cpus=2,
                           results=tmp_path, name="rand", sampler="random", early_stopping=False, seed=3,
                           verbose=True, keep_checkpoints=True)
    lines = []
    outcome = run_sweep(options, log=lines.append)
    trials = read_trials(tmp_path / "rand")
    assert outcome.counts["completed"] == 4 and (trials["epochs"] == EPOCHS).all()
    for trial_id in trials["trial_id"]:
        epochs = [line for line in lines if line.startswith(f"[{trial_id}] epoch ") and "val W-F1" in line]
        assert len(epochs) == EPOCHS, (trial_id, lines)
        trial_dir = next((tmp_path / "rand" / "ray").glob(f"*_{trial_id}_*"))
        kept = sorted(p.name for p in trial_dir.glob("checkpoint_*"))
        assert len(kept) == 2 and (trial_dir / kept[0] / "trainer").is_dir(), kept  # epoch 2's resume state
    assert list(trials.sort_values("number")["suggested_by"]) == ["warm_start", "random", "random", "random"]
    record = json.loads((tmp_path / "rand" / "sweep.json").read_text())
    assert record["sampler"] == "random" and record["early_stopping"] is False and record["seeds"]["sampler"] == 3
    with pytest.raises(SweepError, match="--sampler grid"):
        run_sweep(SweepOptions(space=space_path, data=str(tiny_path), results=tmp_path, sampler="grid"))


def test_export_best_picks_validation_and_retraining_reproduces_it(sweep, tmp_path):
    trials = sweep["trials"]
    out = tmp_path / "best.yaml"
    exported = export_best("s1", out, results=sweep["results"])
    best = trials.loc[trials["best_val_wf1"].idxmax()]
    provenance = exported["provenance"]
    assert provenance["trial_id"] == best["trial_id"] and provenance["mlflow_run_id"] == best["mlflow_run_id"]
    assert provenance["best_val_wf1"] == pytest.approx(best["best_val_wf1"])
    config = load_config(out)
    assert config.epochs == best["best_epoch"]
    for name in ("d", "gamma1", "gamma2", "lr"):  # every searched value is the best trial's
        assert getattr(config, name) == pytest.approx(best[f"param_{name}"])
    assert json.loads(best["config"])["num_threads"] == 1  # a trial's share of the sweep's machine...
    assert (config.num_threads, config.device) == (0, "auto")  # ...is not the retraining machine's
    assert config.data_sha256 == provenance["data_sha256"]
    result = train(config)
    assert result["epochs"][-1]["val_wf1"] == pytest.approx(best["best_val_wf1"], abs=0.005)


def test_final_training_from_the_export_logs_to_the_sweep_store(sweep, tmp_path, capsys):
    out = tmp_path / "best.yaml"
    export_best(sweep["dir"], out)
    assert train_main(["--config", str(out), "--seeds", "2", "--out", str(tmp_path / "final"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "±" in printed
    finals = sweep["client"].search_runs([sweep["runs"][0].info.experiment_id],
                                         filter_string="tags.`cmath.kind` = 'final_training' "
                                                       "and attributes.run_name = 'final'")
    assert len(finals) == 1
    run = finals[0]
    assert run.data.tags["cmath.sweep"] == "s1"
    summary = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert run.data.metrics["test_wf1_at_best_val"] == pytest.approx(summary["test_wf1_at_best_val"])
    assert run.data.metrics["test_wf1_at_best_val_std"] == pytest.approx(summary["test_wf1_at_best_val_std"])


def test_export_best_command_line(sweep, tmp_path, capsys):
    out = tmp_path / "cli-best.yaml"
    assert hpo_main(["export-best", "latest", "-o", str(out), "--results", str(sweep["results"])]) == 0
    printed = capsys.readouterr().out
    best = sweep["outcome"].best
    assert f"best trial {best['trial_id']} of s1" in printed and "cmath-train --config" in printed
    assert yaml.safe_load(out.read_text())["provenance"]["trial_id"] == best["trial_id"]
    assert hpo_main(["export-best", "missing", "-o", str(out), "--results", str(sweep["results"])]) == 2
    assert "error: no sweep 'missing'" in capsys.readouterr().err



def test_rescoring_trains_the_top_trials_on_new_seeds_and_export_takes_the_best_mean(sweep, tmp_path, capsys):
    copy = tmp_path / "s1"  # re-scoring writes into the sweep folder; the other tests keep theirs as it was
    shutil.copytree(sweep["dir"], copy)
    lines = []
    rescore_best(copy, top=2, seeds=1, num_cpus=2, log=lines.append)
    assert ray.is_initialized()  # this process's Ray: used, and left running
    summary = rescore_best(copy, top=2, seeds=2, num_cpus=2, log=lines.append)  # one more seed: only it is trained
    # the top 2, and the space's warm start beside them when it is not among them
    top = sweep["trials"].sort_values(["best_val_wf1", "number"], ascending=[False, True]).head(2)
    warm = sweep["trials"].loc[sweep["trials"]["suggested_by"] == "warm_start", "trial_id"]
    expected = set(top["trial_id"]) | set(warm)
    n = len(expected)
    assert f"{n} runs to train, {n} already in rescored.parquet" in "\n".join(lines)
    table = pd.read_parquet(copy / RESCORE_TABLE)
    assert len(table) == 2 * n and set(table["trial_id"]) == expected and table["error"].isna().all()
    assert sorted(set(table["seed"])) == [SEED_OFFSET, SEED_OFFSET + 1]  # the trials' seed is 0
    means = table.groupby("trial_id")["best_val_wf1"].mean()
    assert summary["picked"] == means.idxmax()
    assert {r["trial_id"]: r["best_val_wf1_mean"] for r in summary["trials"]} == pytest.approx(means.to_dict())
    # a row is what that trial's config trains to on that seed
    row = table.iloc[-1]
    config = json.loads(sweep["trials"].set_index("trial_id").loc[row["trial_id"], "config"])
    retrained = train(from_dict({**config, "seed": int(row["seed"])}))
    assert retrained["best_val_wf1"] == pytest.approx(row["best_val_wf1"], abs=0.005)

    exported = export_best(copy, tmp_path / "best.yaml")
    provenance = exported["provenance"]
    assert provenance["trial_id"] == summary["picked"] and provenance["picked_by"] == "rescore"
    assert provenance["rescore"]["best_val_wf1_mean"] == pytest.approx(means.max())
    assert exported["epochs"] == EPOCHS  # every epoch, as re-scored, not the lucky seed's best one

    parent = _parent(sweep).info.run_id
    children = sweep["client"].search_runs([sweep["runs"][0].info.experiment_id],
                                           filter_string="tags.`cmath.kind` = 'rescore'")
    assert sorted(r.data.tags["cmath.seed"] for r in children) == ["1000"] * n + ["1001"] * n
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent}
    assert set(table["mlflow_run_id"]) == {r.info.run_id for r in children}

    assert hpo_main(["export-best", str(copy), "-o", str(tmp_path / "cli.yaml"), "--top", "2", "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"0 runs to train, {2 * n} already in rescored.parquet" in printed
    assert f"{summary['picked']}: " in printed and "<- picked" in printed and "picked trial" in printed
    assert len(pd.read_parquet(copy / RESCORE_TABLE)) == 2 * n
    assert hpo_main(["export-best", str(copy), "-o", str(tmp_path / "bad.yaml"), "--top", "0"]) == 2
    assert "re-scoring needs at least one trial" in capsys.readouterr().err


def test_ui_serves_the_sweep_runs(sweep, free_port):
    process, url = start_ui(sweep["results"], port=free_port())
    try:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=s1",
                                    timeout=60) as r:
            experiment = json.load(r)["experiment"]
        # A model-training experiment in MLflow's terms, and a link that opens it on its runs.
        assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
        [link] = sweep_links(url, sweep["results"])
        assert link.startswith(f"  sweep s1: {url}/#/experiments/{experiment['experiment_id']}/runs?"
                               f"workflowType=machine_learning&"), link
        request = urllib.request.Request(
            f"{url}/api/2.0/mlflow/runs/search", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"experiment_ids": [experiment["experiment_id"]], "max_results": 100,
                             "filter": "tags.`cmath.kind` = 'trial'"}).encode())
        with urllib.request.urlopen(request, timeout=60) as r:
            listed = {run["info"]["run_id"] for run in json.load(r)["runs"]}
        assert listed == set(sweep["trials"]["mlflow_run_id"])
    finally:
        stop_ui(process)
    assert process.poll() is not None


def test_existing_sweep_name_is_refused(sweep, space_path, tiny_path):
    options = SweepOptions(space=space_path, data=str(tiny_path), num_samples=1, results=sweep["results"], name="s1")
    with pytest.raises(SweepError, match="sweep 's1' already exists.*cmath-hpo resume"):
        run_sweep(options)
    assert find_sweep("s1", sweep["results"]) == sweep["dir"]
    assert find_sweep("latest", sweep["results"]) == sweep["dir"]
    with pytest.raises(SweepError, match="no sweep 'nope'.*sweeps in .*: s1"):
        find_sweep("nope", sweep["results"])


def test_the_dry_run_says_what_the_sweep_did(sweep, space_path, tiny_path, tmp_path, capsys):
    """The same options as the fixture's sweep, as a dry run: the same trials at a time, random
    start-up and first configs (the warm start, then the seeded start-up) as the sweep recorded."""
    record = json.loads((sweep["dir"] / "sweep.json").read_text())
    k, startup = record["max_concurrent"], record["n_startup_trials"]
    assert (record["cluster_slots"], k, startup) == (2, 2, 2)
    args = ["--space", str(space_path), "--data", str(tiny_path), "--num-samples", str(SAMPLES), "--num-cpus", "2",
            "--results", str(tmp_path), "--name", "again"]
    assert hpo_main(["sweep", *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{k} trials at a time (the cluster's 2 slots" in out and f"{startup} random start-up trials" in out
    plan = plan_sweep(SweepOptions(space=space_path, data=str(tiny_path), num_samples=SAMPLES, num_cpus=2,
                                   results=tmp_path, name="again"))
    planned = first_configs(plan, count=len(SPACE["warm_start"]) + startup)  # what no finished trial can change
    ran = [{name: row[f"param_{name}"] for name in plan.searched}
           for row in records(sweep["trials"].sort_values("number"))]
    assert ran[:len(planned)] == planned
    assert "1. d=64  gamma1=1  gamma2=1.8  lr=0.001" in out


def test_report_and_export_of_a_finished_sweep_load_no_ray_or_torch(sweep, tmp_path):
    code = ("import sys\nfrom hpo.cli import main\n"
            f"assert main(['report', {str(sweep['dir'])!r}, '--no-mlflow']) == 0\n"
            f"assert main(['export-best', {str(sweep['dir'])!r}, '-o', {str(tmp_path / 'best.yaml')!r}]) == 0\n"
            "print('loaded:', sorted(m for m in ('ray', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "loaded: []"
    assert (tmp_path / "best.yaml").exists() and (sweep["dir"] / "report" / "report.md").exists()


@pytest.mark.slow
def test_impossible_gpu_request_fails_at_once(space_path, tiny_path, tmp_path, shared_ray):
    options = SweepOptions(space=space_path, data=str(tiny_path), num_samples=1, gpus_per_trial=1, results=tmp_path,
                           name="gpu")
    with pytest.raises(SweepError, match="no node has 1 CPU and 1 GPU"):
        run_sweep(options)
    assert ray.is_initialized()  # a Ray the sweep did not start is left running, even after a refusal


@pytest.mark.slow
def test_shared_storage_and_time_budget_keep_what_finished(space_path, tiny_path, tmp_path, shared_ray):
    """--storage puts Ray's folders elsewhere; a time budget ends the sweep early and the tables
    and MLflow still account for every trial that started; its report says it is incomplete.
    Trials of 1,000 epochs without early stopping cannot end within the 15 s budget, so what
    the budget cuts short does not depend on how fast this machine is: every trial that
    started is interrupted (at least one starts within 15 s, even on a loaded machine: 4 s idle)."""
    storage = tmp_path / "shared"
    options = SweepOptions(space=space_path, data=str(tiny_path), num_samples=40, max_concurrent=2,
                           cpus_per_trial=1, num_cpus=2, results=tmp_path / "results", name="budget",
                           storage=str(storage), time_budget=15, overrides={"epochs": 1000},
                           early_stopping=False)
    outcome = run_sweep(options, log=lambda line: None)
    assert outcome.status == "time_budget_spent"
    trials = read_trials(tmp_path / "results" / "budget")
    assert 1 <= len(trials) <= 2 and set(trials["end_state"]) == {"interrupted"}
    assert (trials["epochs"] < 1000).all()
    assert trials["checkpoint"].notna().all()  # checkpoint_every 2: each kept its latest, in --storage
    assert all(str(path).startswith(str(storage / "budget")) for path in trials["checkpoint"])
    assert not (tmp_path / "results" / "budget" / "ray").exists()
    client = MlflowClient(default_tracking_uri(tmp_path / "results"))
    for row in trials.itertuples():
        run = client.get_run(row.mlflow_run_id)
        assert run.data.tags["cmath.end_state"] == row.end_state
        assert run.info.status == ("KILLED" if row.end_state == "interrupted" else "FINISHED")
    record = json.loads((tmp_path / "results" / "budget" / "sweep.json").read_text())
    assert record["status"] == "time_budget_spent" and record["time_budget_s"] == 15
    study = optuna.load_study(study_name="budget", storage=f"sqlite:///{tmp_path / 'results' / 'budget' / 'optuna.db'}")
    assert not [t for t in study.trials if t.state.name == "RUNNING"]  # cut-short trials are pruned, not left open
    from hpo.report import make_report

    with warnings.catch_warnings(record=True) as warned:  # matplotlib: "No artists with labels", once
        warnings.simplefilter("always")
        text = (make_report(tmp_path / "results" / "budget", log_to_mlflow=False) / "report.md").read_text()
    assert not [w for w in warned if "artists" in str(w.message)], [str(w.message) for w in warned]
    assert "**Incomplete sweep**" in text and "(history.png)" in text
    from hpo.resume import resume_sweep

    with pytest.raises(SweepError, match="ended at its --time-budget"):
        resume_sweep("budget", tmp_path / "results")


# ------------------------------------------------------------------ the report (issue: sweep report)
def test_a_tracking_store_recorded_without_its_secret_is_asked_for_again(sweep, tmp_path, capsys):
    """A password in --mlflow-uri is not written into sweep.json (hpo.storage.redact). The report
    and the re-scoring log to that store after the sweep: they ask for it in one line, before
    anything runs, instead of failing on the `***` a call at a time."""
    copy = tmp_path / "s1"
    shutil.copytree(sweep["dir"], copy, ignore=shutil.ignore_patterns("report"))
    record = json.loads((copy / "sweep.json").read_text())
    real = record["mlflow"]["uri"]
    (copy / "sweep.json").write_text(json.dumps({**record, "mlflow": {**record["mlflow"],
                                                                      "uri": "http://me:***@127.0.0.1:5000"}}))
    assert hpo_main(["report", str(copy)]) == 2
    assert hpo_main(["export-best", str(copy), "-o", str(tmp_path / "b.yaml"), "--top", "1", "--seeds", "1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("without the secret in it (http://me:***@127.0.0.1:5000); pass --mlflow-uri"
                                    in line for line in errors), errors
    assert not (copy / "report").exists() and not (copy / RESCORE_TABLE).exists()
    assert hpo_main(["report", str(copy), "--mlflow-uri", real]) == 0
    assert (copy / "report" / "report.md").exists()


PNG = b"\x89PNG\r\n\x1a\n"


def test_report_writes_every_plot_with_the_data_behind_it(sweep):
    from hpo.report import make_report

    out = make_report("s1", sweep["results"])
    data = json.loads((out / "report.json").read_text())
    for name in ("history", "asha", "importance", "performance_vs_d", "gamma1_gamma2", "per_class_f1", "confusion",
                 "length_buckets"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000, name
        assert f"({name}.png)" in (out / "report.md").read_text()
    trials = sweep["trials"]
    # optimisation history: one point per scored trial, ending at the sweep's best
    assert len(data["history"]["number"]) == trials["best_val_wf1"].notna().sum()
    assert data["history"]["best_so_far"][-1] == pytest.approx(trials["best_val_wf1"].max())
    # ASHA: every trial it stopped is marked where it stopped, on a rung
    stopped = trials[trials["end_state"] == "stopped_by_asha"]
    assert data["asha"]["stopped_at_epoch"] == dict(zip(stopped["trial_id"], stopped["epochs"]))
    assert set(data["asha"]["stopped_at_epoch"].values()) <= set(data["asha"]["rungs"])
    assert tuple(data["asha"]["rungs"]) == asha_rungs(SPACE["asha"]["grace_period"], SPACE["asha"]["reduction_factor"],
                                                      EPOCHS)
    # performance vs d compares trials at one budget: their best within the first rung's epochs
    history = pd.read_parquet(sweep["dir"] / "history.parquet")
    first_rung = data["asha"]["rungs"][0]
    early = history[history["epoch"] <= first_rung].merge(trials[["trial_id", "param_d"]], on="trial_id")
    expected = early.groupby("param_d")["val_wf1"].max()
    same_budget = data["performance_vs_d"]["same_budget"]
    assert same_budget["epochs"] == first_rung
    assert same_budget["d"] == expected.index.tolist()
    assert same_budget["best_val_wf1"] == pytest.approx(expected.tolist())
    # importance over the searched parameters sums to 1, with how far to trust it
    assert set(data["importance"]["values"]) == set(WARM)
    assert sum(data["importance"]["values"].values()) == pytest.approx(1.0)
    stopped_early = (trials["end_state"] == "stopped_by_asha").sum()
    assert data["importance"]["caveat"] == (f"from {SAMPLES} trials, {stopped_early} of them stopped early and ranked "
                                            f"by the best they reached; with fewer than 20 trials read it as a "
                                            f"rough guide")
    report = (sweep["dir"] / "report" / "report.md").read_text()
    assert f"fANOVA {data['importance']['caveat']}." in report
    best = sweep["outcome"].best
    assert f"| best trial | #{best['number']} `{best['trial_id']}`" in report
    if best["suggested_by"] == "warm_start":
        assert "the space's warm-start point, not one the search found" in report
    # the best trial's test numbers: buckets partition the test utterances, the matrix counts them all
    best = data["best_test"]
    n = best["num_utterances"]
    assert sum(best["length_buckets"]["utterances"]) == n == int(np.sum(best["confusion"]))
    assert best["acc"] == pytest.approx(sweep["outcome"].best["test_acc_at_best_val"])
    assert data["best"]["trial_id"] == sweep["outcome"].best["trial_id"]
    text = (out / "report.md").read_text()
    assert "paper-style best test epoch W-F1" in text and "validation-selected test" in text
    logged = {a.path for a in sweep["client"].list_artifacts(_parent(sweep).info.run_id, "report")}
    assert "report/report.md" in logged and "report/importance.png" in logged


def test_the_report_of_a_sweep_without_its_study_copy_reads_the_journal(sweep, tmp_path):
    """optuna.db is the copy made when a sweep stops; a killed driver leaves only the journal."""
    from hpo.report import make_report

    copy = sweep["dir"] / "optuna.db"
    assert copy.exists() and (sweep["dir"] / "ray" / "cmath_study").is_dir()
    with_copy = json.loads((make_report("s1", sweep["results"], log_to_mlflow=False) / "report.json").read_text())
    copy.rename(tmp_path / "optuna.db")
    try:
        without = json.loads((make_report("s1", sweep["results"], log_to_mlflow=False) / "report.json").read_text())
    finally:
        (tmp_path / "optuna.db").rename(copy)
    assert without["importance"] == with_copy["importance"] and set(without["importance"]["values"]) == set(WARM)


def _parent(sweep):
    return next(r for r in sweep["runs"] if r.data.tags.get("cmath.kind") == "sweep")


def test_length_buckets_follow_the_paper():
    from hpo.report import length_buckets

    index, names = length_buckets(np.array([3, 45, 80]), "iemocap")
    assert names == ["1-39", "40-69", "70+"]
    assert list(np.bincount(index)) == [3, 45, 80]
    index, names = length_buckets(np.array([9, 10, 20, 21]), "meld")
    assert names == ["1-9", "10-20", "21+"] and list(np.bincount(index)) == [9, 30, 21]


def test_final_training_compared_with_the_paper_defaults(sweep, tmp_path, capsys):
    out = tmp_path / "best.yaml"
    export_best(sweep["dir"], out)
    args = ["--config", str(out), "--seeds", "2", "--epochs", "2", "--compare", "paper", "--out", str(tmp_path / "c"),
            "--quiet"]
    assert train_main(args) == 0
    printed = capsys.readouterr().out
    assert "paper defaults:" in printed and "Welch t =" in printed
    summary = json.loads((tmp_path / "c" / "metrics.json").read_text())
    welch = summary["compare"]["welch"]["test_wf1_at_best_val"]
    ours = [r["test_wf1_at_best_val"] for r in summary["per_seed"]]
    paper = json.loads((tmp_path / "c" / "paper" / "metrics.json").read_text())
    theirs = [r["test_wf1_at_best_val"] for r in paper["per_seed"]]
    assert welch["ours"] == ours and welch["paper"] == theirs
    spread = np.var(ours, ddof=1) / len(ours) + np.var(theirs, ddof=1) / len(theirs)
    assert spread > 0  # d 32-96 against the paper's d 500: the two configs score differently
    assert welch["t"] == pytest.approx((np.mean(ours) - np.mean(theirs)) / np.sqrt(spread))
    assert 0 < welch["p"] <= 1
    assert paper["config"]["d"] == 500 and paper["config"]["lr"] == 3.0e-3 and paper["seeds"] == summary["seeds"]
    baselines = sweep["client"].search_runs([sweep["runs"][0].info.experiment_id],
                                            filter_string="tags.`cmath.kind` = 'paper_baseline'")
    assert len(baselines) == 1
    assert train_main(["--config", str(out), "--compare", "paper"]) == 2


# ------------------------------------------------------------------ the MLflow UI in a real browser
def _browser():
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, ("the browser test needs Debian's chromium and chromium-driver: "
                                 "apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)  # local driver: nothing is downloaded


def _wait_for_text(page, texts, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = page.find_element("tag name", "body").text
        if all(text in body for text in texts):
            return body
        time.sleep(0.5)
    missing = [t for t in texts if t not in page.find_element("tag name", "body").text]
    raise AssertionError(f"the MLflow UI never showed {missing}")


@pytest.mark.browser
def test_mlflow_ui_in_a_real_browser_lists_every_trial_and_charts_metrics(sweep, tmp_path, free_port):
    trials = sweep["trials"]
    page = _browser()  # first: without a browser the test fails before any server is started
    try:
        process, url = start_ui(sweep["results"], port=free_port())
    except BaseException:
        page.quit()
        raise
    try:
        page.get(f"{url}/#/experiments")
        _wait_for_text(page, ["s1"])  # the sweep's experiment is listed
        experiment = sweep["runs"][0].info.experiment_id
        # The link `cmath-hpo ui` prints opens the experiment on its runs, without a click: MLflow
        # 3.17's plain experiment link opens a GenAI traces page ("Traces 0", "Detect Issues").
        # It lists every trial, best first, each named by its number and score, the best marked:
        # without it the trials are nested, collapsed, under the parent run and named by Ray's ids.
        [link] = [line for line in sweep_links(url, sweep["results"]) if line.startswith("  sweep s1: ")]
        page.get(link.split(": ", 1)[1])
        ranked = trials.sort_values(["best_val_wf1", "number"], ascending=[False, True])
        names = [f"#{row.number} W-F1 {100 * row.best_val_wf1:.2f}%" for row in ranked.itertuples()]
        body = _wait_for_text(page, [f"{SAMPLES} matching runs", *names])
        assert "Detect Issues" not in body, body[:500]
        assert [body.index(name) for name in names] == sorted(body.index(name) for name in names), body[:2000]
        assert f"★ {names[0]}" in body and body.count("★") == 1, body[:2000]
        page.save_screenshot(str(tmp_path / "runs.png"))
        best = sweep["outcome"].best
        page.get(f"{url}/#/experiments/{experiment}/runs/{best['mlflow_run_id']}/model-metrics")
        _wait_for_text(page, [f"★ {names[0]}", "Model metrics", "loss_kl"])
        search = page.find_element("css selector", "input[placeholder='Search metric charts']")
        search.send_keys("test_wf1")  # only the charts of that metric stay
        _wait_for_text(page, ["test_wf1"])
        deadline = time.monotonic() + 30
        while not page.find_elements("css selector", ".js-plotly-plot") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert page.find_elements("css selector", ".js-plotly-plot"), "no metric chart drawn"
        page.save_screenshot(str(tmp_path / "metrics.png"))
    finally:
        page.quit()
        stop_ui(process)
    assert (tmp_path / "runs.png").read_bytes()[:8] == PNG and (tmp_path / "metrics.png").stat().st_size > 10000
