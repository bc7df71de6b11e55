"""`cmath-hpo report SWEEP`: the analyses a CMATH paper shows, made from a sweep's own files.

Reads trials.parquet, history.parquet, sweep.json, the Optuna study (optuna.db) and the best
trial's checkpoint (its `best/` folder, or the MLflow artifact when the folder is gone);
writes `<sweep>/report/` (PNG plots, report.md, report.json with the numbers behind every
plot) and logs the folder to the sweep's MLflow parent run. Works on an interrupted sweep,
on whatever finished, and says so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cmath_model.metrics import accuracy, confusion_matrix, per_class_f1, weighted_f1  # noqa: E402

from .errors import SweepError  # noqa: E402
from .plan import asha_rungs  # noqa: E402
from .record import OPTUNA_FILE, find_sweep, read_record, tracked_record  # noqa: E402
from .space import show  # noqa: E402
from .study import open_storage  # noqa: E402
from .trials import HISTORY_FILE, TRIALS_FILE, best_row, read_trials, state_words  # noqa: E402

# Conversation-length buckets of the paper's Fig. 5 (utterances per dialogue).
LENGTH_BUCKETS = {"iemocap": [(1, 39), (40, 69), (70, None)], "meld": [(1, 9), (10, 20), (21, None)]}
FEW_TRIALS = 20  # below this, fANOVA's ranking is a rough guide (the report says so)
STATE_COLOURS = {"completed": "tab:green", "stopped_by_asha": "tab:orange", "failed": "tab:red",
                 "interrupted": "tab:gray", "running": "tab:gray"}


def make_report(sweep: str | Path, results: str | Path = "results", log_to_mlflow: bool = True,
                mlflow_uri: str | None = None) -> Path:
    """The paper's analyses of a sweep (finished or not) as PNG plots, report.md and report.json
    in <sweep>/report/, also logged to the sweep's MLflow parent run. Returns that folder.

    Args:
        sweep: a sweep folder, a sweep name under `results`, or `latest`.
        results: the folder sweeps are written to.
        log_to_mlflow: log the report to the sweep's parent run.
        mlflow_uri: the sweep's tracking store, if not the recorded one (e.g. its secret, which
            is not recorded).

    >>> folder = make_report("latest")
    >>> sorted(p.name for p in folder.glob("*.png"))[:3]
    """
    sweep_dir = find_sweep(sweep, results)
    if not (sweep_dir / TRIALS_FILE).exists():
        raise SweepError(f"{sweep_dir}: no {TRIALS_FILE} yet; no trial of this sweep has started")
    record = read_record(sweep_dir)
    if log_to_mlflow or mlflow_uri:
        record = tracked_record(record, mlflow_uri)
    trials = read_trials(sweep_dir).sort_values("number").reset_index(drop=True)
    history = pd.read_parquet(sweep_dir / HISTORY_FILE) if (sweep_dir / HISTORY_FILE).exists() else pd.DataFrame()
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    searched = record.get("searched", [])
    data: dict = {"sweep": record["name"], "made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    figures: dict[str, str] = {}

    data["counts"] = {k: int(v) for k, v in trials["end_state"].value_counts().items()}
    data["status"] = record.get("status", "running")
    data["num_samples"] = record.get("num_samples")
    figures["history"] = _history(trials, out / "history.png", data)
    if len(history):
        figures["asha"] = _asha(trials, history, record, out / "asha.png", data)
    figures["importance"] = _importance(sweep_dir, record, trials, out / "importance.png", data)
    if "d" in searched:
        figures["d"] = _versus_d(trials, history, record, out / "performance_vs_d.png", data)
    if {"gamma1", "gamma2"} <= set(searched):
        figures["gamma"] = _gamma_map(trials, out / "gamma1_gamma2.png", data)
    best = best_row(trials)
    if best is not None:
        data["best"] = {k: v for k, v in best.items() if k != "config"}
        data["best"]["config"] = json.loads(best["config"])
        predictions, classes = _best_predictions(best, record, out)
        if predictions is not None:
            figures.update(_best_trial_figures(predictions, classes, data["best"]["config"]["dataset"], out, data))
    figures = {k: v for k, v in figures.items() if v}
    (out / "report.json").write_text(json.dumps(data, indent=1, default=_plain))
    (out / "report.md").write_text(_markdown(record, trials, data, figures))
    if log_to_mlflow:
        _log(record, out)
    return out


# ------------------------------------------------------------------ plots
def _history(trials: pd.DataFrame, path: Path, data: dict) -> str:
    scored = trials[trials["best_val_wf1"].notna()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for state, group in scored.groupby("end_state"):
        ax.scatter(group["number"], 100 * group["best_val_wf1"], label=state_words(state),
                   color=STATE_COLOURS.get(state, "tab:blue"), zorder=3)
    running = scored.sort_values("number")["best_val_wf1"].cummax()
    ax.step(scored.sort_values("number")["number"], 100 * running, where="post", color="black", label="best so far")
    ax.set(xlabel="trial number (from 0, as in trials.parquet, the study and the MLflow run names)",
           ylabel="best validation W-F1 (%)", title="Optimisation history")
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)
    data["history"] = {"number": scored["number"].tolist(), "best_val_wf1": scored["best_val_wf1"].tolist(),
                       "best_so_far": running.tolist()}
    return path.name


def _asha(trials: pd.DataFrame, history: pd.DataFrame, record: dict, path: Path, data: dict) -> str:
    rungs = list(_rungs(record))
    fig, ax = plt.subplots(figsize=(7, 4))
    stopped = {}
    for row in trials.itertuples():
        curve = history[history["trial_id"] == row.trial_id].sort_values("epoch")
        if not len(curve):
            continue
        colour = STATE_COLOURS.get(row.end_state, "tab:blue")
        ax.plot(curve["epoch"], 100 * curve["val_wf1"], color=colour, alpha=0.7, linewidth=1)
        if row.end_state == "stopped_by_asha":
            ax.scatter(curve["epoch"].iloc[-1], 100 * curve["val_wf1"].iloc[-1], marker="x", color=colour, zorder=3)
            stopped[row.trial_id] = int(curve["epoch"].iloc[-1])
    for r in rungs:
        ax.axvline(r, color="gray", linestyle="--", linewidth=0.8)
    shown = [state for state in STATE_COLOURS if (trials["end_state"] == state).any()]
    ax.legend(handles=[Line2D([], [], color=STATE_COLOURS[state], label=state_words(state)) for state in shown]
              + [Line2D([], [], color="gray", marker="x", linestyle="", label="stopped by ASHA here")] * bool(stopped)
              + [Line2D([], [], color="gray", linestyle="--", label="ASHA rung")] * bool(rungs), fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="validation W-F1 (%)",
           title=f"Learning curves; ASHA rungs (dashed) at {rungs}, x = stopped there")
    _save(fig, path)
    data["asha"] = {"rungs": rungs, "stopped_at_epoch": stopped}
    return path.name


def _rungs(record: dict) -> tuple[int, ...]:
    """The sweep's ASHA rungs, as the sweep computed them (none without early stopping)."""
    asha = record.get("asha") or {}
    if not record.get("early_stopping", True) or not asha.get("max_t"):
        return ()
    if "rungs" in asha:
        return tuple(asha["rungs"])
    # a sweep.json from before the rungs were recorded
    return asha_rungs(asha["grace_period"], asha["reduction_factor"], asha["max_t"])


def _importance(sweep_dir: Path, record: dict, trials: pd.DataFrame, path: Path, data: dict) -> str | None:
    """fANOVA over every trial that reached a score, stopped ones included with the best
    validation W-F1 they reached: with ASHA most trials are stopped, and Optuna's importance
    would otherwise see only the few that ran to the end."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    from optuna.trial import create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    own = sweep_dir / OPTUNA_FILE  # a copy made when the sweep stopped; a killed driver's sweep has only its study
    storage = f"sqlite:///{own.resolve()}" if own.exists() else open_storage(record["study"]["storage"])
    study = optuna.load_study(study_name=record["name"], storage=storage)
    score = dict(zip(trials["trial_id"], trials["best_val_wf1"]))
    scored = [t for t in study.get_trials(deepcopy=False)
              if pd.notna(score.get(t.user_attrs.get("ray_trial_id"))) and t.params]
    if len(scored) < 2:
        data["importance"] = {"note": f"needs at least 2 trials with a score; has {len(scored)}"}
        return None
    view = optuna.create_study(direction="maximize")
    for t in scored:
        view.add_trial(create_trial(params=t.params, distributions=t.distributions,
                                    value=float(score[t.user_attrs["ray_trial_id"]])))
    try:
        importances = get_param_importances(view, evaluator=FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as exc:
        data["importance"] = {"note": f"fANOVA could not run: {exc}"}
        return None
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(names)))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    stopped = int(trials["end_state"].eq("stopped_by_asha").sum())
    caveat = (f"from {len(scored)} trials, {stopped} of them stopped early and ranked by the best they reached"
              + (f"; with fewer than {FEW_TRIALS} trials read it as a rough guide" if len(scored) < FEW_TRIALS else ""))
    ax.set(xlabel="importance for the best validation W-F1 (fANOVA, sums to 1)",
           title=f"Hyperparameter importance ({len(scored)} trials{', rough' if len(scored) < FEW_TRIALS else ''})")
    _save(fig, path)
    data["importance"] = {"method": "fanova on each trial's best validation W-F1", "trials": len(scored),
                          "values": dict(importances), "caveat": caveat}
    return path.name


def _versus_d(trials: pd.DataFrame, history: pd.DataFrame, record: dict, path: Path, data: dict) -> str:
    """Best validation W-F1 per d, compared at one budget: a trial ASHA stopped at its first rung
    had fewer epochs than one that finished, so joining both in one line makes a d look bad for
    being stopped. The line takes every trial's best up to the first rung (the epochs all of them
    had); trials are drawn by how they ended. Validation only: test scores are for the end, not
    for choosing d (the best trial's are in the report's table)."""
    scored = trials[trials["best_val_wf1"].notna()]
    budget = next(iter(_rungs(record)), None)
    fig, ax = plt.subplots(figsize=(6, 4))
    for state, marker in (("completed", "o"), ("stopped_by_asha", "x")):
        some = scored[scored["end_state"] == state]
        if len(some):
            ax.scatter(some["param_d"], 100 * some["best_val_wf1"], marker=marker, alpha=0.6,
                       color=STATE_COLOURS[state], label=f"{state_words(state)}: its best (val)")
    finished = scored[scored["end_state"] == "completed"]
    by_d = finished.groupby("param_d")[["best_val_wf1"]].max().reset_index()
    same_budget = None
    if budget is not None and len(history):
        early = history[(history["epoch"] <= budget) & history["trial_id"].isin(scored["trial_id"])]
        d_of = scored.set_index("trial_id")["param_d"]
        per_trial = early.groupby("trial_id")["val_wf1"].max()
        same_budget = per_trial.groupby(d_of.loc[per_trial.index].to_numpy()).max().sort_index()
        ax.plot(same_budget.index, 100 * same_budget.to_numpy(), "o-", color="tab:blue",
                label=f"best per d within {budget} epochs (every trial)")
    ax.set(xlabel="d", ylabel="validation W-F1 (%)", title="Performance vs d (paper Fig. 4)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _save(fig, path)
    data["performance_vs_d"] = {
        "finished": by_d.to_dict("list"),
        "same_budget": None if same_budget is None else {"epochs": budget, "d": same_budget.index.tolist(),
                                                         "best_val_wf1": same_budget.tolist()}}
    return path.name


def _gamma_map(trials: pd.DataFrame, path: Path, data: dict) -> str:
    scored = trials[trials["best_val_wf1"].notna()]
    fig, ax = plt.subplots(figsize=(6, 5))
    points = ax.scatter(scored["param_gamma1"], scored["param_gamma2"], c=100 * scored["best_val_wf1"],
                        cmap="viridis", s=60, edgecolors="black")
    fig.colorbar(points, ax=ax, label="best validation W-F1 (%)")
    ax.set(xlabel="γ1 (low-level distillation)", ylabel="γ2 (high-level distillation)",
           title="Validation W-F1 over γ1 × γ2 (paper Fig. 6)")
    _save(fig, path)
    data["gamma_map"] = {"gamma1": scored["param_gamma1"].tolist(), "gamma2": scored["param_gamma2"].tolist(),
                         "best_val_wf1": scored["best_val_wf1"].tolist()}
    return path.name


def _best_predictions(best: dict, record: dict, out: Path) -> tuple[dict | None, list[str]]:
    folder = Path(best["checkpoint"]) if best.get("checkpoint") else None
    if folder is None or not (folder / "test_predictions.npz").exists():
        folder = _download_best(best, record, out)
    if folder is None:
        return None, []
    predictions = dict(np.load(folder / "test_predictions.npz"))
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").exists() else {}
    classes = metrics.get("classes") or [f"class {k}" for k in range(predictions["prob"].shape[1])]
    return predictions, classes


def _download_best(best: dict, record: dict, out: Path) -> Path | None:
    if not best.get("mlflow_run_id"):
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(record["mlflow"]["uri"])
    folder = out / "best"
    folder.mkdir(exist_ok=True)
    try:  # what the plots need, not the weights (tens of MB)
        for name in ("test_predictions.npz", "metrics.json"):
            client.download_artifacts(best["mlflow_run_id"], f"best/{name}", str(out))
    except Exception:  # noqa: BLE001 - no artifact: the report goes on without the best-trial plots
        return None
    return folder


def length_buckets(dialogue_lengths: np.ndarray, dataset: str) -> tuple[np.ndarray, list[str]]:
    """Each test utterance's bucket index, by the length of its dialogue (paper Fig. 5)."""
    per_utterance = np.repeat(dialogue_lengths, dialogue_lengths)
    bounds = LENGTH_BUCKETS.get(dataset, LENGTH_BUCKETS["iemocap"])
    names = [f"{lo}-{hi}" if hi else f"{lo}+" for lo, hi in bounds]
    index = np.full(len(per_utterance), -1)
    for k, (lo, hi) in enumerate(bounds):
        index[(per_utterance >= lo) & ((per_utterance <= hi) if hi else True)] = k
    return index, names


def _best_trial_figures(predictions: dict, classes: list[str], dataset: str, out: Path, data: dict) -> dict:
    y, pred = predictions["label"], predictions["pred"]
    labels = list(range(len(classes)))
    matrix = confusion_matrix(y, pred, len(classes))
    per_class = per_class_f1(matrix)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(classes, 100 * per_class, color="tab:blue")
    ax.set(ylabel="test F1 (%)", title="Best trial: per-class F1 on test (paper Fig. 7)")
    _save(fig, out / "per_class_f1.png")

    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(labels, classes, rotation=45, ha="right")
    ax.set_yticks(labels, classes)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title="Best trial: test confusion matrix")
    _save(fig, out / "confusion.png")

    bucket, names = length_buckets(predictions["dialogue_lengths"], dataset)
    scores, counts = [], []
    for k in range(len(names)):
        mask = bucket == k
        counts.append(int(mask.sum()))
        scores.append(weighted_f1(confusion_matrix(y[mask], pred[mask], len(classes))) if mask.any() else None)
    fig, ax = plt.subplots(figsize=(6, 4))
    heights = [100 * (s or 0) for s in scores]
    ax.bar(names, heights, color="tab:blue")
    for k, n in enumerate(counts):  # above the bar: an empty bucket has none to write on
        ax.annotate(f"{n} utterances", (k, heights[k]), xytext=(0, 3), textcoords="offset points", ha="center",
                    fontsize=8)
    ax.set_ylim(0, max(heights + [1]) * 1.15)
    ax.set(xlabel="conversation length (utterances)", ylabel="test W-F1 (%)",
           title="Best trial by conversation length (paper Fig. 5)")
    _save(fig, out / "length_buckets.png")

    data["best_test"] = {
        "classes": classes, "per_class_f1": per_class.tolist(), "confusion": matrix.tolist(),
        "acc": accuracy(matrix), "num_utterances": int(len(y)),
        "length_buckets": {"names": names, "utterances": counts, "wf1": scores},
    }
    return {"per_class": "per_class_f1.png", "confusion": "confusion.png", "length": "length_buckets.png"}


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plain(value):
    return value.item() if hasattr(value, "item") else str(value)


# ------------------------------------------------------------------ text
def _markdown(record: dict, trials: pd.DataFrame, data: dict, figures: dict) -> str:
    counts = data["counts"]
    ended = sum(counts.get(s, 0) for s in ("completed", "stopped_by_asha", "failed"))
    lines = [f"# Sweep report: {record['name']}", ""]
    if data["status"] != "finished":
        lines += [f"**Incomplete sweep** (status `{data['status']}`): {ended} of {record.get('num_samples')} trials "
                  "ended; everything below uses what finished.", ""]
    lines += ["| | |", "|---|---|",
              f"| trials | {counts.get('completed', 0)} completed, {counts.get('stopped_by_asha', 0)} stopped by ASHA, "
              f"{counts.get('failed', 0)} failed, {counts.get('interrupted', 0)} interrupted |",
              f"| wall time | {_seconds(record.get('wall_seconds'))} (trials trained "
              f"{_seconds(record.get('trial_train_seconds'))} in all) |",
              f"| data | `{record['data']['path']}` (sha256 {record['data']['sha256'][:12]}…) |"]
    best = data.get("best")
    if best:
        config = best["config"]
        searched = ", ".join(f"{k}={show(config[k])}" for k in record.get("searched", []))
        origin = best.get("suggested_by")
        origin = ("the space's warm-start point, not one the search found" if origin == "warm_start"
                  else f"suggested by {origin}" if origin else "")
        lines += [f"| best trial | #{int(best['number'])} `{best['trial_id']}` (MLflow run "
                  f"`{best.get('mlflow_run_id')}`){'; ' + origin if origin else ''} |",
                  f"| its searched values | {searched} |",
                  f"| best validation W-F1 | {100 * best['best_val_wf1']:.2f} at epoch {int(best['best_epoch'])} |",
                  f"| validation-selected test | ACC {100 * best['test_acc_at_best_val']:.2f}, "
                  f"W-F1 {100 * best['test_wf1_at_best_val']:.2f} |",
                  f"| paper-style best test epoch W-F1 | {100 * best['best_test_wf1']:.2f} "
                  "(selected on test: optimistic) |"]
    lines.append("")
    titles = {"history": "Optimisation history", "asha": "ASHA: learning curves and rungs",
              "importance": "Hyperparameter importance", "d": "Performance vs d",
              "gamma": "γ1 × γ2", "per_class": "Best trial: per-class F1", "confusion": "Best trial: confusion",
              "length": "Best trial by conversation length"}
    for key, name in figures.items():
        lines += [f"## {titles[key]}", "", f"![{titles[key]}]({name})", ""]
        if key == "importance":
            lines += [f"fANOVA {data['importance']['caveat']}.", ""]
    if "note" in data.get("importance", {}):
        lines += ["## Hyperparameter importance", "", f"Not computed: {data['importance']['note']}.", ""]
    top = trials[trials["best_val_wf1"].notna()].sort_values("best_val_wf1", ascending=False).head(10)
    params = [c for c in trials.columns if c.startswith("param_")]
    lines += ["## Top trials", "", "| # | trial | state | " + " | ".join(p[6:] for p in params)
              + " | val W-F1 | test W-F1 (val-selected) | epochs |",
              "|" + "---|" * (len(params) + 6)]
    for row in top.itertuples():
        values = " | ".join(show(getattr(row, p)) for p in params)
        lines.append(f"| {int(row.number)} | `{row.trial_id}` | {row.end_state} | {values} | "
                     f"{100 * row.best_val_wf1:.2f} | {100 * row.test_wf1_at_best_val:.2f} | {int(row.epochs)} |")
    return "\n".join(lines) + "\n"




def _seconds(value) -> str:
    return f"{value:.0f} s" if isinstance(value, (int, float)) else "n/a (not finished)"


def _log(record: dict, out: Path) -> None:
    parent = record.get("mlflow", {}).get("parent_run_id")
    if not parent:
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(record["mlflow"]["uri"]).log_artifacts(parent, str(out), "report")
