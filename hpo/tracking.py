"""MLflow for sweeps: one parent run per sweep, one child run per trial, all logged from the driver.

Ray's stock MLflowLoggerCallback logs one call per metric (slow on the driver's loop), logs
Ray's bookkeeping keys, uploads no checkpoints and opens a second run for a resumed trial.
This callback logs only the model's metrics (step = epoch), uploads the trial's best-validation
checkpoint when the trial ends, tags how it ended, and finds a resumed trial's existing run by
its `cmath.trial_id` tag instead of opening another.

Tune waits for its callbacks before it hands a trial its next epoch, so nothing slow happens
in them: opening a trial's run, its metrics, tags and uploads go to one background thread
(MlflowWriter), in order, and the metrics that piled up meanwhile leave in one `log_batch` per
run. The callbacks name a trial's run by the trial's id; the writer looks the run up when it
makes the call, after the call that opened it. Its queue is bounded: a tracking store that
cannot keep up slows the sweep's loop instead of filling the driver's memory.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback
from ray.tune.experiment import Trial

from cmath_model.tracking import log_artifacts_once, log_metrics, metrics_at, open_run

from .checkpoints import last_checkpoint, prune_checkpoints
from .provenance import trial_runs
from .record import FAILURES_FILE
from .recovery import (
    CHECKPOINTS_OF,
    ENDED_CHECKPOINT,
    LOST,
    REPLAYED,
    RESTORE_NOTE,
    error_summary,
    error_text,
    is_epoch,
    read_ended,
    searched_config,
    trial_key,
)
from .trainable import model_metrics
from .trials import end_state, ended_state, read_journal, state_words, trial_number

logger = logging.getLogger("hpo")


def keep_going(hook):
    """A tracking store that fails (a server restarting, a full disk) must not end hours of
    training: the hook warns and the sweep goes on; the trials' own files still have everything."""

    @functools.wraps(hook)
    def guarded(self, *args, **kwargs):
        try:
            return hook(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            warn_failure(self, hook.__name__, exc)
            return None

    return guarded


MAX_FAILURE_NOTES = 5


def warn_failure(owner, where: str, exc: Exception) -> None:
    """Count a failed MLflow call on `owner` and say so; the sweep goes on."""
    owner.failures = getattr(owner, "failures", 0) + 1
    notes = owner.__dict__.setdefault("failure_notes", [])
    if len(notes) < MAX_FAILURE_NOTES:
        notes.append(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    logger.warning("MLflow logging failed in %s (%s: %s); the sweep goes on", where, type(exc).__name__,
                   str(exc)[:200])


MAX_QUEUED = 10_000  # calls and metric batches waiting for the writer (each result is one)


PROBE_PERIOD_S = 10.0  # while the store does not answer, how often the writer tries it again
# What an unreachable or hanging store looks like once MLflow's own retries are spent.
_UNREACHABLE = ("timed out", "Max retries exceeded", "Connection refused", "Connection aborted",
                "RemoteDisconnected", "Failed to establish", "ConnectionError", "ReadTimeout")


def unreachable(exc: Exception) -> bool:
    """Whether a failed call says the store did not answer (rather than refused the call)."""
    text = f"{type(exc).__name__}: {exc}"
    return any(sign in text for sign in _UNREACHABLE)


class MlflowWriter:
    """One background thread that makes the MLflow calls handed to it, in the order given.
    Metrics waiting together are merged into one log_batch per run. A failing call warns and
    the rest go on (a tracking store that fails must not end hours of training).

    A store that does not answer (a server that hangs or is down) must not stop the sweep either:
    Tune's loop waits on this queue once it is full. So the first call that finds the store
    unreachable opens a breaker: from then on calls are parked in order and metrics dropped
    (their trials noted), at no cost, and every `probe_period` seconds the store is tried again.
    When it answers, the parked calls are made and `recovered` is told which trials' metrics
    were dropped (MlflowTrials sends them from the journal). What is still parked when the
    writer closes is counted as failed: the summary says so, and `resume` sends it."""

    def __init__(self, client: MlflowClient, resolve: Callable[[str, int | None], str | None] | None = None,
                 recovered: Callable[[set[str]], None] | None = None, probe_period: float = PROBE_PERIOD_S):
        self.client = client
        # resolve(target, step): the run that metrics handed over for `target` go to, or None to
        # drop them (an epoch already logged); by default the target is the run id
        self.resolve = resolve or (lambda target, step: target)
        self.recovered = recovered or (lambda targets: None)
        self.probe_period = probe_period
        self.queue: queue.Queue = queue.Queue(maxsize=MAX_QUEUED)
        self.failures = 0
        self.failure_notes: list[str] = []
        self.down_since: float | None = None  # time.monotonic() when the store stopped answering
        self.parked: list[tuple] = []  # (fn, args, kwargs) waiting for the store, in order
        self.dropped: set[str] = set()  # targets whose metrics were dropped while it was down
        self.outages = 0
        self.thread = threading.Thread(target=self._run, name="mlflow-writer", daemon=True)
        self.thread.start()

    def metrics(self, target: str, metrics: list[Metric], step: int | None = None) -> None:
        self.queue.put(("metrics", target, (metrics, step)))

    def call(self, fn, *args, **kwargs) -> None:
        self.queue.put(("call", fn, (args, kwargs)))

    def flush(self) -> None:
        self.queue.join()

    def close(self) -> None:
        """Make every call handed over so far, then end the thread: a sweep's last uploads and run
        ends must not die with the process (the thread is a daemon, so a stuck store cannot hang
        the exit of a sweep that never closes it)."""
        self.queue.put(("stop", None, None))
        self.thread.join()

    def _run(self) -> None:
        while True:
            try:
                items = [self.queue.get(timeout=self.probe_period if self.down_since is not None else None)]
            except queue.Empty:
                self._probe()
                continue
            while items[-1][0] != "stop":  # take everything already waiting
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stop = items[-1][0] == "stop"
            try:
                self._probe()
                self._do([item for item in items if item[0] != "stop"])
                if stop:
                    self._probe(force=True)
                    self._give_up()
            finally:
                for _ in items:
                    self.queue.task_done()
            if stop:
                return

    def _do(self, items: list[tuple]) -> None:
        pending: dict[str, tuple[str, list[Metric]]] = {}
        for kind, target, payload in items + [("call", None, None)]:
            if kind == "metrics":
                if self.down_since is not None:
                    self.dropped.add(target)
                    continue
                run_id = self.resolve(target, payload[1])
                if run_id is not None:
                    pending.setdefault(run_id, (target, []))[1].extend(payload[0])
                continue
            for run_id, (metrics_target, metrics) in pending.items():  # metrics go before the call after them
                if self.down_since is not None or not self._attempt(log_metrics, (self.client, run_id, metrics), {}):
                    self.dropped.add(metrics_target)
            pending = {}
            if target is not None:
                args, kwargs = payload
                if self.down_since is not None:
                    self.parked.append((target, args, kwargs))
                else:
                    self._attempt(target, args, kwargs, park=True)

    def _attempt(self, fn, args: tuple, kwargs: dict, park: bool = False) -> bool:
        """Make one call; False if it failed. A store that did not answer opens the breaker (and
        with `park` the call waits for the store); any other failure is counted and warned of."""
        try:
            fn(*args, **kwargs)
            return True
        except Exception as exc:  # noqa: BLE001
            if not unreachable(exc):
                warn_failure(self, getattr(fn, "__name__", str(fn)), exc)
                return False
            if park:
                self.parked.append((fn, args, kwargs))
            if self.down_since is None:
                self.down_since, self.outages = time.monotonic(), self.outages + 1
                logger.warning("MLflow store does not answer (%s); logging waits and training goes on, tried again "
                               "every %gs", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
                               self.probe_period)
            return False

    def _probe(self, force: bool = False) -> None:
        """While the store is down: once a probe period has passed (or `force`), try it; when it
        answers, make the parked calls and tell `recovered` whose metrics were dropped."""
        if self.down_since is None:
            return
        if not force and time.monotonic() - self.down_since < self.probe_period:
            return
        try:
            self.client.search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - still down
            self.down_since = time.monotonic()
            return
        logger.warning("MLflow store answers again; sending what waited")
        self.down_since = None
        parked, self.parked = self.parked, []
        for index, (fn, args, kwargs) in enumerate(parked):
            if self.down_since is not None:  # down again: keep the rest, in order
                self.parked.extend(parked[index:])
                return
            self._attempt(fn, args, kwargs, park=True)
        dropped, self.dropped = self.dropped, set()
        if dropped and not self._attempt(self.recovered, (dropped,), {}):
            self.dropped |= dropped

    def _give_up(self) -> None:
        """At the end, what could not be sent is counted as failed (resume sends it)."""
        if self.parked or self.dropped:
            warn_failure(self, "MLflow store unreachable at the sweep's end",
                         RuntimeError(f"{len(self.parked)} calls and the metrics of {len(self.dropped)} trials not "
                                      f"sent; `cmath-hpo resume` sends them once the store answers"))


def find_run(client: MlflowClient, experiment: str, tags: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment], filter_string=query, max_results=2)
    return runs[0].info.run_id if runs else None


def _received_ms(row: dict) -> int | None:
    received = row.get("received_at")
    return int(received * 1000) if isinstance(received, (int, float)) else None


def trial_run_name(number: int, config: dict, searched: list[str], state: str | None = None,
                   best_val_wf1: float | None = None) -> str:
    """What a trial's run is called in MLflow: its number (as in trials.parquet and the Optuna
    study, from 0), once it ended its best validation W-F1 (in percent, as the console and the
    report show it) and how it ended if not completed, then the values it tried. The sweep's
    best trial gets a mark in front when the sweep ends (hpo.provenance.mark_best_run).

    Args:
        number: the trial's number.
        config: its config (the searched values are read from it).
        searched: the searched names, in the space's order.
        state: how it ended (hpo.trials.end_state); None while it runs.
        best_val_wf1: its best validation W-F1, a fraction.

    Returns:
        The name, e.g. `#3  W-F1 84.03%  d=256 gamma1=1.2 gamma2=0.4 lr=0.001`.
    """
    from .space import show

    words = [f"#{number}"]
    if best_val_wf1 is not None:
        words.append(f"W-F1 {100 * best_val_wf1:.2f}%")
    if state not in (None, "completed"):
        words.append(state_words(state))
    words.append(" ".join(f"{name}={show(config.get(name), 3)}" for name in searched))
    return "  ".join(words)[:250]


class MlflowTrials(Callback):
    """Child runs for trials under the sweep's parent run."""

    def __init__(self, uri: str, experiment: str, parent_run_id: str, sweep: str, base: dict,
                 searched: list[str], sweep_dir: str | Path | None = None, prune: bool = False,
                 ended_dir: str | None = None, resumed: bool = True):
        # A resumed sweep's trials may have runs from the driver before; a new sweep's have none,
        # and searching the store for one costs a scan of every run's tags per trial (6 ms at 100
        # runs, 10 ms at 3,000 on a local store). Searched anyway when opening a run is retried:
        # the store may have made the run before the call failed.
        self.resumed = resumed
        self.open_tried: set[str] = set()
        self.sweep_dir = Path(sweep_dir) if sweep_dir is not None else None
        self.ended_dir = ended_dir  # where a trial that ended before a resume left its checkpoint's path
        self.prune = prune  # ended trials keep only their latest best/, deleted once it is uploaded
        self.uri = uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.sweep = sweep
        self.base = base
        self.searched = searched
        # trial key -> its run, and the last epoch logged to it: written by the writer thread only
        self.run_ids: dict[str, str] = {}
        self.last_step: dict[str, int] = {}
        self.ended: set[str] = set()  # trials whose run the loop has asked the writer to end
        self._client: MlflowClient | None = None
        self._writer: MlflowWriter | None = None
        self._journal: dict[str, list[dict]] | None = None  # read once, for the first run a resume continues

    def __getstate__(self) -> dict:
        # Tune pickles this on its loop while the writer may add to these dicts: copied first
        # (a dict copy holds the GIL throughout)
        return {**self.__dict__, "_client": None, "_writer": None, "_journal": None, "run_ids": dict(self.run_ids),
                "last_step": dict(self.last_step), "open_tried": set(self.open_tried)}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    @property
    def writer(self) -> MlflowWriter:
        if self._writer is None:
            self._writer = MlflowWriter(self.client, resolve=self._metrics_run, recovered=self._resend,
                                        probe_period=PROBE_PERIOD_S)
        return self._writer

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Everything handed to the writer is done and its thread has ended."""
        if self._writer is not None:
            self._writer.close()
            self.failures = getattr(self, "failures", 0) + self._writer.failures
            self.__dict__.setdefault("failure_notes", []).extend(self._writer.failure_notes)
            self._writer = None

    @property
    def failure_count(self) -> int:
        return getattr(self, "failures", 0) + (self._writer.failures if self._writer is not None else 0)

    def open_run(self, key: str, config: dict, reopen: bool = False, name: str | None = None) -> str:
        """The trial's run (`key`: hpo.recovery.trial_key): the one already in the store (a
        resumed trial, or one carried on under its old id), else a new child called `name`. In
        the writer."""
        if key in self.run_ids:
            if reopen:  # a trial that ran before (an earlier driver, a retry) continues
                self.client.update_run(self.run_ids[key], status="RUNNING")
            return self.run_ids[key]
        tags = {"cmath.sweep": self.sweep, "cmath.trial_id": key}
        run_id = find_run(self.client, self.experiment, tags) if self.resumed or key in self.open_tried else None
        self.open_tried.add(key)
        if run_id is None:
            run_id = open_run(self.client, self.experiment, name or key, tags={
                **tags, "mlflow.parentRunId": self.parent_run_id, "cmath.kind": "trial",
                "cmath.searched": ",".join(self.searched)}, params={**self.base, **config})
            self.last_step[key] = 0
        else:
            self.client.update_run(run_id, status="RUNNING")
            self._backfill(key, run_id)
        self.run_ids[key] = run_id
        return run_id

    def _backfill(self, key: str, run_id: str) -> None:
        """Continue a run from the journal: the epochs the journal has and the run lacks were lost
        with a driver stopped before its writer sent them (`ray job stop` kills 3 s after its
        SIGTERM). Sent once, in order, before anything new; `last_step` is where the run is then."""
        history = self.client.get_metric_history(run_id, "val_wf1")
        self.last_step[key] = max((m.step for m in history), default=0)
        if self.sweep_dir is None:
            return
        if self._journal is None:
            self._journal = read_journal(self.sweep_dir)
        rows = {int(row["epoch"]): row for row in self._journal.get(key, [])}
        missing = [epoch for epoch in sorted(rows) if epoch > self.last_step[key]]
        if missing:
            # stamped when the driver received each epoch, as the lost call would have been
            log_metrics(self.client, run_id, [
                m for epoch in missing
                for m in metrics_at(model_metrics(rows[epoch]), epoch, _received_ms(rows[epoch]))])
            self.last_step[key] = missing[-1]

    def _resend(self, keys: set[str]) -> None:
        """In the writer, once the store answers again: the epochs it missed, from the journal."""
        self._journal = None  # read again: it has grown since
        for key in sorted(keys):
            if key in self.run_ids:
                self._backfill(key, self.run_ids[key])

    def _metrics_run(self, key: str, step: int | None) -> str | None:
        """Where an epoch's metrics go, in the writer: nowhere if the run could not be opened or
        already has the epoch (replayed after a restore)."""
        if key not in self.run_ids or (step is not None and step <= self.last_step.get(key, 0)):
            return None
        if step is not None:
            self.last_step[key] = step
        return self.run_ids[key]

    def _on_run(self, key: str, fn, *args, **kwargs) -> None:
        """fn(run id, ...) in the writer, on the trial's run."""
        if key not in self.run_ids:
            raise RuntimeError(f"trial {key} has no MLflow run (opening it failed)")
        fn(self.run_ids[key], *args, **kwargs)

    @keep_going
    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        key = trial_key(trial)
        reopen = key in self.ended
        self.ended.discard(key)
        name = trial_run_name(trial_number(trials, trial), trial.config, self.searched)
        self.writer.call(self.open_run, key, searched_config(trial.config), reopen, name)

    @keep_going
    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info) -> None:
        if not is_epoch(result):
            return
        key = trial_key(trial)
        if RESTORE_NOTE in result:
            self.writer.call(self._on_run, key, self._add_restore_note, result[RESTORE_NOTE])
        step = int(result["epoch"])
        self.writer.metrics(key, metrics_at(model_metrics(result), step), step)

    def _add_restore_note(self, run_id: str, note: str) -> None:
        run = self.client.get_run(run_id)
        notes = "; ".join(filter(None, [run.data.tags.get("cmath.restore_note"), note]))
        self.client.set_tag(run_id, "cmath.restore_note", notes[:5000])

    @keep_going
    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        state = end_state(trial.last_result)
        self._finish(trials, trial, state, "KILLED" if state == "interrupted" else "FINISHED")

    @keep_going
    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        self._finish(trials, trial, "failed", "FAILED", error=error_summary(trial))

    def on_experiment_end(self, trials: list[Trial], **info) -> None:
        try:
            self._end_runs(trials)
        finally:
            self.close()
            self._write_failures()

    @keep_going
    def _end_runs(self, trials: list[Trial]) -> None:
        # The time budget and Ctrl-C end running trials without on_trial_complete: close their
        # runs (KILLED, with best/ where there is one) in the writer, behind their last metrics.
        self.flush()  # every run the writer was asked to open is open
        for trial in trials:
            if trial_key(trial) in self.run_ids and trial_key(trial) not in self.ended:
                self._finish(trials, trial, "interrupted", "KILLED")
        # A run still open for a trial Ray does not know started after Ray's last saved state
        # before a driver was killed; a resume carries it on.
        known = {trial_key(t): t for t in trials}
        for run in self.child_runs("and attributes.status = 'RUNNING'"):
            key = run.data.tags.get("cmath.trial_id")
            state = ended_state(known[key]) if key in known else None
            if state is not None and key not in self.ended:
                # ended before a killed driver's writer closed its run; Ray's restored state knows
                # how, and the trial gets no event in this driver: what the writer did not send
                # comes from the journal and the trial's ended record (Ray's own record of its
                # checkpoint may be stale)
                self._backfill(key, run.info.run_id)
                self.upload_best(self._ended_checkpoint(key), run.info.run_id, replayed=True)
                self.client.log_batch(run.info.run_id, tags=[RunTag("cmath.end_state", state)])
                self.client.update_run(run.info.run_id, name=self._ended_name(trials, known[key], state))
                status = {"failed": "FAILED", "interrupted": "KILLED"}.get(state, "FINISHED")
                self.client.set_terminated(run.info.run_id, status)
                continue
            if key not in known:
                self.client.log_batch(run.info.run_id, tags=[RunTag("cmath.end_state", "interrupted"),
                                                             RunTag("cmath.restore_note", LOST)])
                self.client.set_terminated(run.info.run_id, "KILLED")

    def _ended_checkpoint(self, key: str) -> tuple[pafs.FileSystem, str] | None:
        """The checkpoint a trial ended with, as its ended record has it."""
        recorded = read_ended(self.ended_dir, key) if self.ended_dir else None
        if not recorded or not recorded.get("checkpoint"):
            return None
        return pafs.FileSystem.from_uri(self.ended_dir)[0], recorded["checkpoint"]

    def _write_failures(self) -> None:
        """What failed, for the sweep's summary and sweep.json (see read_failures)."""
        if self.sweep_dir is None:
            return
        notes = getattr(self, "failure_notes", [])
        path = self.sweep_dir / FAILURES_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"failures": self.failure_count, "notes": notes[:MAX_FAILURE_NOTES]}))
        os.replace(tmp, path)

    def child_runs(self, condition: str = "") -> list:
        return trial_runs(self.client, self.experiment, self.sweep, condition)

    def _ended_name(self, trials: list[Trial], trial: Trial, state: str) -> str:
        best = (trial.last_result or {}).get("best_val_wf1")
        return trial_run_name(trial_number(trials, trial), trial.config, self.searched, state,
                              best if isinstance(best, (int, float)) else None)

    def _finish(self, trials: list[Trial], trial: Trial, state: str, status: str, error: str | None = None) -> None:
        """Tags, its name with how it ended, error text, the best checkpoint and the run's end,
        in the writer's order (after the trial's last metrics). What is read off the trial is
        read now, while it is current."""
        key = trial_key(trial)
        tags = [RunTag("cmath.end_state", state)]
        if error:
            tags.append(RunTag("cmath.error", error))
        name = self._ended_name(trials, trial, state)
        self.writer.call(self._on_run, key, lambda run_id: self.client.log_batch(run_id, tags=tags))
        self.writer.call(self._on_run, key, lambda run_id: self.client.update_run(run_id, name=name))
        if error:
            self.writer.call(self._on_run, key, self.client.log_text, error_text(trial), "error.txt")
        replayed = bool((trial.last_result or {}).get(REPLAYED))
        checkpoint = last_checkpoint(trial)
        self.writer.call(self._on_run, key, lambda run_id: self.upload_best(checkpoint, run_id, replayed))
        # An interrupted trial may be resumed from its checkpoints; a replayed one without a
        # recorded checkpoint cannot say which one to keep.
        if self.prune and state != "interrupted" and not (replayed and ENDED_CHECKPOINT not in trial.last_result):
            self.writer.call(prune_checkpoints, checkpoint, trial.config.get(CHECKPOINTS_OF))  # once best/ is uploaded
        self.writer.call(self._on_run, key, self.client.set_terminated, status)
        self.ended.add(key)

    def upload_best(self, checkpoint: tuple[pafs.FileSystem, str] | None, run_id: str,
                    replayed: bool = False) -> None:
        """The checkpoint's best/ folder (only that: not the resume state beside it) as the run's artifact."""
        if checkpoint is None:
            return
        if replayed and self.client.list_artifacts(run_id, "best"):
            return  # uploaded when the trial really ended, before the sweep was resumed
        fs, best = checkpoint[0], f"{checkpoint[1]}/best"
        if fs.get_file_info(best).type != pafs.FileType.Directory:
            return
        if isinstance(fs, pafs.LocalFileSystem):
            log_artifacts_once(self.client, run_id, best, "best")
            return
        with tempfile.TemporaryDirectory(prefix="cmath-best-") as local:
            pafs.copy_files(best, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            self.client.log_artifacts(run_id, local, "best")
