"""The sweep's own tables: `trials.parquet` (one row per trial) and `history.parquet` (one row
per trial and epoch), each rewritten atomically from all its rows while the sweep runs (when
something changed) and once at its end. Between two writes the driver waits TABLE_PERIOD_S, or
longer as the tables grow: at least 19 times what the last write took (as Tune's "auto" period
for its snapshots) and its size over TABLE_BYTES_PER_S. At a fixed period, what the tables cost
grows as the square of the trials: 10,000 trials of 20 epochs make an 84 MB history.parquet,
2.6 s of the driver's CPU to write (measured). Rewriting them at every
trial's start and end cost the driver time that grew with the sweep (N trials x all rows so far),
stalling Tune's loop between trials' epochs. What must survive a killed driver is written at once
and costs the same for every trial: each result is appended to the journal (`history.jsonl`), and
each ended trial gets its ended record (hpo.recovery); a resume rebuilds the tables from them."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pandas as pd
from ray.tune import Callback
from ray.tune.experiment import Trial

from cmath_model.train import summarize

from .checkpoints import checkpoint_uri, last_checkpoint
from .mirror import SweepMirror
from .recovery import (
    CHECKPOINT_HISTORY,
    ENDED_AT,
    ENDED_CHECKPOINT,
    LOST,
    REPLAYED,
    RESTORE_NOTE,
    RESTORED_FROM,
    error_summary,
    is_epoch,
    read_ended,
    read_lines,
    searched_config,
    trial_key,
    write_ended,
)
from .study import open_storage
from .tracking import MlflowTrials
from .trainable import final_result, model_metrics
from .trials import (
    HISTORY_FILE,
    JOURNAL_FILE,
    TRIALS_FILE,
    end_state,
    ended_state,
    read_journal,
    read_trials,
    records,
    trial_number,
    write_parquet_atomic,
)

TABLE_PERIOD_S = 10.0  # like Tune's own experiment snapshots
TABLE_BYTES_PER_S = 250_000  # like Tune's snapshots (hpo.tuner.SNAPSHOT_BYTES_PER_S)

logger = logging.getLogger("hpo")


def wait_after_write(seconds: float, size: int) -> float:
    """How long the tables wait after a write, beyond their period (see the module).

    Args:
        seconds: what the write took.
        size: the bytes of both tables it left.

    Returns:
        Seconds: 19 times the write's, or the size over TABLE_BYTES_PER_S, the longer.
    """
    return max(19 * seconds, size / TABLE_BYTES_PER_S)


class TrialTable(Callback):
    def __init__(self, sweep_dir: str | Path, base: dict, searched: list[str], tracker: MlflowTrials | None = None,
                 study_storage: str | None = None, study_name: str = "cmath", ended_dir: str | None = None,
                 mirror: SweepMirror | None = None, storage_query: str = "", period: float = TABLE_PERIOD_S):
        self.sweep_dir = Path(sweep_dir)
        self.base = base
        self.searched = searched
        self.tracker = tracker
        self.study_storage = study_storage
        self.study_name = study_name
        self.ended_dir = ended_dir
        self.mirror = mirror  # the sweep's records on a shared storage, sent at each of Tune's snapshots
        self.storage_query = storage_query  # kept on checkpoint URIs: the storage's endpoint, say
        self.rows: dict[str, dict] = {}
        self.history: dict[str, dict[int, dict]] = {}
        self.period = period
        self._study = None  # opened once, at the first write
        self._changed = False  # since the tables were last written
        self._written_at = -math.inf  # time.monotonic() of that write, in this process
        self._wait = 0.0  # beyond the period, after that write (see the module)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_study": None, "_written_at": -math.inf, "_wait": 0.0}

    def setup(self, **info) -> None:
        # A resumed sweep starts from the tables its first driver wrote.
        trials = self.sweep_dir / TRIALS_FILE
        if trials.exists() and not self.rows:
            for row in records(read_trials(self.sweep_dir)):
                self.rows[row["trial_id"]] = row
        if not self.history:
            for trial_id, rows in read_journal(self.sweep_dir).items():
                self.history[trial_id] = {int(row["epoch"]): row for row in rows}
            for trial_id, epochs in self.history.items():
                if trial_id in self.rows:
                    self._summarise(self.rows[trial_id], epochs)

    def get_state(self) -> None:
        """Tune asks for this as it saves its experiment state, just before it uploads it: the
        moment the mirror is sent, so it is as new as what a resume restores. Nothing is
        returned: the tables are rebuilt from the sweep's files."""
        self._send_mirror()
        return None

    def _send_mirror(self) -> None:
        if self.mirror is None:
            return
        try:
            self.mirror.sync()
        except Exception as exc:  # noqa: BLE001 - the sweep goes on; the next snapshot tries again
            logger.warning("mirroring the sweep's records to %s failed (%s: %s); the next snapshot tries again",
                           self.mirror.target, type(exc).__name__, str(exc)[:200])

    def row(self, trial: Trial, number: int | None = None) -> dict:
        key = trial_key(trial)
        if key not in self.rows:
            config = {**self.base, **searched_config(trial.config)}
            self.rows[key] = {
                "trial_id": key, "number": len(self.rows) if number is None else number,
                "end_state": "running",
                **{f"param_{k}": trial.config.get(k) for k in self.searched},
                "epochs": 0, "epochs_planned": config.get("epochs"),
                "best_epoch": None, "best_val_wf1": None, "best_val_acc": None,
                "test_wf1_at_best_val": None, "test_acc_at_best_val": None, "best_test_wf1": None,
                "last_val_wf1": None, "train_seconds": 0.0, "started_at": time.time(), "finished_at": None,
                "error": None, "restarts": 0, "epochs_redone": 0, "nodes": None, "restore_notes": None,
                "checkpoint": None, "mlflow_run_id": None,
                "suggested_by": None,
                "config": json.dumps(config),
            }
        return self.rows[key]

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        row = self.row(trial, number=trial_number(trials, trial))
        row["end_state"] = "running"
        self._note_change()

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info) -> None:
        if not is_epoch(result):
            return
        if RESTORE_NOTE in result:
            row = self.row(trial)
            row["restore_notes"] = "; ".join(filter(None, [row.get("restore_notes"), result[RESTORE_NOTE]]))
        epoch = int(result["epoch"])
        row, key = self.row(trial), trial_key(trial)
        restored_from = result.get(RESTORED_FROM) or (result.get(ENDED_CHECKPOINT) if REPLAYED in result else None)
        if restored_from:
            self._take_checkpoint_history(trial, key, restored_from)
        if epoch in self.history.get(key, {}) and REPLAYED not in result:
            row["epochs_redone"] = int(row.get("epochs_redone") or 0) + 1  # after a restart from a checkpoint
        node = str(result.get("node_id", ""))[:12]
        if node and node not in (row.get("nodes") or "").split(","):
            row["nodes"] = ",".join(filter(None, [row.get("nodes"), node]))
        # received_at: when the driver had the epoch (benchmarks.overhead reads the sweep's timeline from it)
        record = {"trial_id": key, "epoch": epoch, **model_metrics(result), "node": node or None,
                  "pid": result.get("pid"), "received_at": time.time()}
        self.history.setdefault(key, {})[epoch] = record
        with open(self.sweep_dir / JOURNAL_FILE, "a") as journal:
            journal.write(json.dumps(record) + "\n")
        self._summarise(row, self.history[key])
        row["epochs"], row["last_val_wf1"] = epoch, result["val_wf1"]
        self._changed = True  # written with the next due write, not now: Tune waits for this callback

    def _take_checkpoint_history(self, trial: Trial, key: str, checkpoint: str) -> None:
        """The epochs up to a checkpoint a trial came back from, those this driver's journal
        lacks: a resume on another host starts from the journal's mirror, which can be older
        than the checkpoint (see hpo.mirror)."""
        rows = read_lines(trial.storage.storage_filesystem, f"{checkpoint.rstrip('/')}/{CHECKPOINT_HISTORY}")
        known = self.history.setdefault(key, {})
        missing = [{"trial_id": key, **r} for r in rows if int(r["epoch"]) not in known]
        if not missing:
            return
        with open(self.sweep_dir / JOURNAL_FILE, "a") as journal:
            for record in missing:
                known[int(record["epoch"])] = record
                journal.write(json.dumps(record) + "\n")

    @staticmethod
    def _summarise(row: dict, epochs: dict[int, dict]) -> None:
        summary = summarize([epochs[e] for e in sorted(epochs)])  # the same best epoch as cmath-train's
        summary.pop("best_test_wf1_note")
        row.update(summary, epochs=max(epochs), last_val_wf1=epochs[max(epochs)]["val_wf1"],
                   train_seconds=sum(r.get("epoch_seconds", 0.0) for r in epochs.values()))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        self._finish(trial, end_state(trial.last_result))
        self._write_if_due()

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        row = self.row(trial)
        row["restarts"] = int(row.get("restarts") or 0) + 1
        self._note_change()

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        self._finish(trial, "failed", error=error_summary(trial))
        self._write_if_due()

    def on_experiment_end(self, trials: list[Trial], **info) -> None:
        self._record_ended_before_the_resume(trials)
        known = {trial_key(t): t for t in trials}
        for trial_id, row in self.rows.items():
            if row["end_state"] != "running":
                continue
            if trial_id in known:
                row.update(end_state="interrupted", checkpoint=checkpoint_uri(known[trial_id], self.storage_query))
            else:  # started after Ray's last saved state, then the driver was killed: Ray cannot resume it
                row.update(end_state="interrupted", restore_notes=LOST)
        try:  # the tracking store may be gone; the tables must still be written
            lost_runs = self.tracker.child_runs() if self.tracker is not None else []
        except Exception:  # noqa: BLE001 - the tracker counted and reported its own failures
            lost_runs = []
        if lost_runs:  # killed between opening a trial's MLflow run and recording its row
            for run in lost_runs:
                trial_id = run.data.tags.get("cmath.trial_id")
                if trial_id not in self.rows:
                    self.rows[trial_id] = {"trial_id": trial_id, "number": len(self.rows), "end_state": "interrupted",
                                           "restore_notes": LOST, "mlflow_run_id": run.info.run_id,
                                           "started_at": run.info.start_time / 1000}
        self.write()
        self._send_mirror()

    def _record_ended_before_the_resume(self, trials: list[Trial]) -> None:
        """A trial that Ray's restored state has as ended gets no event in a resumed driver; the
        tables, written on a timer, may have missed its end (or, killed within a period of its
        start, the trial itself). Its row comes from Ray's record of it, the journal and its ended
        record (when it ended)."""
        for index, trial in enumerate(trials):
            state, key = ended_state(trial), trial_key(trial)
            if state is None or (key in self.rows and self.rows[key]["end_state"] != "running"):
                continue
            row = self.row(trial, number=index)
            if key in self.history:
                self._summarise(row, self.history[key])
            if state != "interrupted":  # one cut short (Ctrl-C, the time budget) is not over: see below
                recorded = read_ended(self.ended_dir, key) if self.ended_dir else None
                self._finish(trial, state, error=error_summary(trial) if state == "failed" else None,
                             finished_at=(recorded or {}).get("finished_at"))

    def _finish(self, trial: Trial, state: str, error: str | None = None, finished_at: float | None = None) -> None:
        """Record the trial's end (written with the tables' next write); `finished_at` when it
        ended before this driver saw it."""
        row, result = self.row(trial), trial.last_result or {}
        if result.get(REPLAYED):  # an ended trial replayed after a resume keeps when it really ended
            finished_at = row.get("finished_at") or result.get(ENDED_AT) or finished_at
        row.update(end_state=state, error=error if error else row.get("error"),
                   checkpoint=checkpoint_uri(trial, self.storage_query), finished_at=finished_at or time.time())
        # The ended record first: once the table says a trial ended, a resume must replay it,
        # even when the driver is killed between the two writes.
        if self.ended_dir:
            mark_ended(self.ended_dir, trial, state, error, row["finished_at"])
        self._changed = True

    def on_step_end(self, iteration: int, trials: list[Trial], **info) -> None:
        self._write_if_due()  # Tune calls this at every turn of its loop

    def _note_change(self) -> None:
        self._changed = True
        self._write_if_due()

    def _write_if_due(self) -> None:
        if self._changed and time.monotonic() - self._written_at >= max(self.period, self._wait):
            self.write()

    def write(self) -> None:
        started = time.monotonic()
        self._add_origins()
        if self.tracker is not None:  # the tracker's writer opens each run after the trial starts
            for key, row in self.rows.items():
                row["mlflow_run_id"] = row.get("mlflow_run_id") or self.tracker.run_ids.get(key)
        rows = sorted(self.rows.values(), key=lambda r: r["number"])
        frame = pd.DataFrame(rows)
        for column in [c for c in frame.columns if c.startswith("param_")]:
            kinds = {type(v) for v in frame[column] if v is not None and v == v}
            if len(kinds) > 1 and not kinds <= {int, float}:  # a categorical of mixed types, e.g. [256, "auto"]
                frame[column] = frame[column].map(lambda v: None if v is None else str(v))
        write_parquet_atomic(frame, self.sweep_dir / TRIALS_FILE)
        rows = [r for epochs in self.history.values() for r in epochs.values()]
        write_parquet_atomic(pd.DataFrame(rows), self.sweep_dir / HISTORY_FILE)
        self._changed, self._written_at = False, time.monotonic()
        written = sum((self.sweep_dir / name).stat().st_size for name in (TRIALS_FILE, HISTORY_FILE))
        self._wait = wait_after_write(self._written_at - started, written)

    def _add_origins(self) -> None:
        """Which part of the searcher proposed each trial: warm_start, random or tpe."""
        if not self.study_storage:
            return
        import optuna

        if self._study is None:
            self._study = optuna.load_study(study_name=self.study_name, storage=open_storage(self.study_storage))
        # ray_trial_id: the Ray trial the study trial was asked for, whose id the row keeps when
        # another carries it on (trial_key)
        by_ray_id = {t.user_attrs.get("ray_trial_id"): t for t in self._study.get_trials(deepcopy=False)}
        for trial_id, row in self.rows.items():
            if trial_id in by_ray_id:
                row["suggested_by"] = by_ray_id[trial_id].user_attrs.get("suggested_by")
                row["optuna_state"] = by_ray_id[trial_id].state.name


def mark_ended(ended_dir: str, trial: Trial, state: str, error: str | None, finished_at: float) -> None:
    """Tell a later resume that this trial is over (Ray's own state can lag behind a killed driver)."""
    checkpoint = last_checkpoint(trial)
    write_ended(ended_dir, trial_key(trial), {"end_state": state, "error": error, "finished_at": finished_at,
                                            "result": final_result(trial.last_result or {}),
                                            "checkpoint": checkpoint and checkpoint[1]})
