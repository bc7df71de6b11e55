"""One sweep trial as a Ray Tune class trainable over cmath_model's Trainer.

A class (not a function) so Ray can reuse a trial's worker process for the next trial
(`reset_config`) instead of paying for a new process and its imports each time.

Every checkpoint holds two folders: `trainer/` (everything needed to resume the run exactly)
and `best/` (the best-validation epoch so far: weights, config, test predictions, metrics,
which is what MLflow receives and `cmath-eval` loads). Checkpoints cost time (about 1 s at
d 500: 310 MB written, then copied to Ray's storage), so one is written only where it can
matter, with only what can matter:
- at the epochs where ASHA may stop the trial (its rungs) and at the trial's last epoch, so
  the best weights outlive the trial; between checkpoints they wait in memory;
- every `checkpoint_every` epochs, for resuming after a lost worker or driver. `trainer/`
  (model plus Adam state, 3x the weights) is written only when `checkpoint_every` asks for
  resumability, and never at the last epoch: a finished trial has nothing left to resume,
  so its final checkpoint records its last result instead, and a restore replays it.
"""

from __future__ import annotations

import gc
import json
import os
import random
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray
import torch
from ray import tune

from cmath_model.config import from_dict
from cmath_model.data import Dataset
from cmath_model.train import TRAIN_KEYS, Trainer

from ._compat import TrainingResult, number_checkpoints_after, restart_iteration_count, trial_folder
from .checkpoints import checkpoint_folders, trial_folders
from .recovery import (
    CHECKPOINT_HISTORY,
    CHECKPOINTS_OF,
    CONTINUES,
    ENDED_AT,
    ENDED_CHECKPOINT,
    OUT_OF_MEMORY,
    REPLAYED,
    RESTORE_NOTE,
    RESTORED_FROM,
    STORAGE_FAULT,
    TRIAL_ERROR,
    read_ended,
    read_json,
    searched_config,
)
from .storage import probe_storage, redact

SCORE_KEYS = ("val_acc", "val_wf1", "test_acc", "test_wf1")
# setup: building the trial's model and optimiser; checkpoint: its checkpoints so far, Ray's copy to storage included
TIMING_KEYS = ("train_seconds", "epoch_seconds", "setup_seconds", "checkpoint_seconds")
BEST_KEYS = ("best_val_wf1", "best_epoch")
PER_CLASS_PREFIXES = ("val_f1_", "test_f1_")
# Tune keeps running statistics (min, max, means over the last 5 and 10 steps) of every numeric
# key of every result, in each trial's state, which every experiment snapshot writes whole: with
# the per-class F1s that was over half of a trial's state (benchmarks.driver). So a result
# carries as numbers only what ASHA, the searcher and the driver's callbacks decide on; the
# epoch's other numbers travel as one JSON text under DETAILS, which Tune keeps but does not
# count, and `model_metrics` gives them back to the journal, the tables and MLflow.
DETAILS = "cmath_details"
SCHEDULING_KEYS = ("epoch", "val_wf1", *BEST_KEYS)


def model_metrics(result: dict) -> dict[str, float]:
    """The model's own per-epoch numbers in a Tune result, without Ray's bookkeeping keys.

    Args:
        result: a trial's result as Tune passes it on (or as an ended record or a journal row
            keeps it), its DETAILS unpacked; results from before DETAILS have every number at
            the top level.

    Returns:
        Every score, loss, timing and per-class F1 of the epoch, as floats.
    """
    details = result.get(DETAILS)
    merged = {**result, **json.loads(details)} if isinstance(details, str) else result
    keep = set(TRAIN_KEYS) | set(SCORE_KEYS) | set(TIMING_KEYS) | set(BEST_KEYS)
    return {k: float(v) for k, v in merged.items()
            if (k in keep or k.startswith(PER_CLASS_PREFIXES)) and isinstance(v, (int, float))}


CHECKPOINT_FILE = "checkpoint.json"  # in each checkpoint: the epoch it holds
# A trial out of its share of a GPU waits this long, up to twice as long at random, before it is
# retried: packed trials that ran out together do not come back together into the same memory.
OOM_BACKOFF_S = 5.0


class StorageFault(OSError):
    """The trial's node cannot use the sweep's storage: a fault of the node, not of the config."""


class DoesNotFit(RuntimeError):
    """The trial's config does not fit in the GPU memory it had to itself."""


class CMATHTrial(tune.Trainable):
    """`config` holds the searched values; `base` (the sweep's fixed config) and `dataset`
    arrive once through the object store via `tune.with_parameters`.

    Ray retries every failed trial alike, but only a lost worker deserves a retry: a trial that
    raised (a bad config, a NaN loss) would fail again. So an error is first reported as a
    result carrying TRIAL_ERROR, on which the driver turns retries off for this trial
    (hpo.recovery.NoRetryOnTrialError), and then raised on the next step, so Ray records the
    trial as ERROR with the real exception.

    A fault of the trial's place, not of its config, is reported the same way under its own key
    (STORAGE_FAULT, OUT_OF_MEMORY), and the driver decides how it is retried (hpo.placement):
    before any training, a trial checks that its node can read the driver's marker on the sweep's
    storage and write beside it (`probe`: the marker's folder and token), since a node that cannot
    would train to its first checkpoint and fail there."""

    oom_backoff_s = OOM_BACKOFF_S  # see OOM_BACKOFF_S

    def setup(self, config: dict, base: dict | None = None, dataset: Dataset | None = None,
              ended_dir: str | None = None, checkpoint_epochs: tuple[int, ...] = (),
              probe: tuple[str, str] | None = None) -> None:
        self.base = base or {}
        self.dataset = dataset
        self.ended_dir = ended_dir
        self.checkpoint_epochs = set(checkpoint_epochs)  # ASHA's rungs: where the trial may be stopped
        self.probe = probe
        self.gpu_share = (gpu_memory_share(ray.get_runtime_context().get_assigned_resources())
                          if ray.is_initialized() else None)
        if self.gpu_share is not None and torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(self.gpu_share, 0)  # device 0: the one Ray made visible
        self._start(config)
        self.carries_on = config.get(CHECKPOINTS_OF)  # see _carry_on
        self.unrestored = True  # see _resume_from_storage
        self._check_storage()

    def _check_storage(self) -> None:
        """Set the trial's fault when its node cannot use the sweep's storage (see the class)."""
        self.fault: tuple[str, Exception] | None = None  # (its result key, the error raised after the report)
        self.fault_reported = False
        if not self.probe:
            return
        folder, token = self.probe
        node = ray.get_runtime_context().get_node_id()
        problem = probe_storage(folder, token, node)
        if problem:
            storage = redact(folder).partition("?")[0].rsplit("/", 1)[0]  # the experiment's folder there
            self.fault = (STORAGE_FAULT, StorageFault(
                f"node {node[:12]} ({ray.util.get_node_ip_address()}) cannot use the sweep's storage {storage}: "
                f"{problem}"))

    def _start(self, params: dict) -> None:
        self.drop_trainer()  # a reused worker's previous trial, or a restore that starts over
        self.error: Exception | None = None
        self.reported_error = False
        self.restore_note: str | None = None
        # A trial the driver saw end is not trained again, whatever a stale Ray state says about it.
        key = params.get(CONTINUES) or self.trial_id
        self.ended: dict | None = read_ended(self.ended_dir, key) if self.ended_dir else None
        self.checkpoint_seconds = 0.0
        self.last_result: dict = {}
        self.reported: list[dict] = []  # every epoch's numbers, as the sweep's journal has them
        self.restored_from: str | None = None  # see RESTORED_FROM
        started = time.perf_counter()
        try:
            self.cmath_config = from_dict({**self.base, **searched_config(params)}, source="trial config")
            self.trainer = Trainer(self.cmath_config, self.dataset, keep_best=True)
        except Exception as exc:  # raised from step(), after the driver knows
            self.error = exc
        self.setup_seconds = time.perf_counter() - started

    def step(self) -> dict:
        if self.fault is not None:
            return self._report_fault()
        if self.carries_on:
            self._carry_on(self.carries_on)
        elif self.unrestored:
            self._resume_from_storage()
        if self.ended is not None and self.ended["end_state"] != "failed":
            replay = {**self.ended["result"], "done": True, REPLAYED: True}
            if self.restored_from:
                replay[RESTORED_FROM] = self.restored_from
            if self.ended.get("checkpoint"):  # Ray's restored state may name an older one, since pruned
                replay[ENDED_CHECKPOINT] = self.ended["checkpoint"]
            if self.ended.get("finished_at"):  # the tables may have missed the end: a killed driver
                replay[ENDED_AT] = self.ended["finished_at"]
            return replay
        if self.ended is not None:
            self.error = RuntimeError(self.ended.get("error") or "failed before the sweep was resumed")
        if self.error is not None and out_of_memory(self.error) and not self.reported_error:
            return self._out_of_memory(self.error)  # building the model already ran out
        if self.error is not None:
            if self.reported_error:
                raise self.error
            self.reported_error = True
            return {TRIAL_ERROR: f"{type(self.error).__name__}: {self.error}"}
        try:
            result = self._epoch()
            if self.restore_note:
                result[RESTORE_NOTE], self.restore_note = self.restore_note, None
            if self.restored_from:
                result[RESTORED_FROM], self.restored_from = self.restored_from, None
            return result
        except Exception as exc:
            if out_of_memory(exc):
                return self._out_of_memory(exc)
            self.error = exc
            self.reported_error = True
            return {TRIAL_ERROR: f"{type(exc).__name__}: {exc}"}

    def _out_of_memory(self, exc: Exception) -> dict:
        """Out of GPU memory. In a share of a GPU (`--gpus-per-trial` below 1), its neighbours or its
        placement may be to blame: a fault of the place, retried on its own budget after a back-off
        (hpo.placement). On a GPU of its own, nothing else is: the config does not fit, and the
        trial fails as a config error would."""
        self.drop_trainer()  # its memory goes back to the GPU now, not when the actor ends
        if self.gpu_share is None:
            self.error = DoesNotFit(f"out of memory on a GPU of its own, so this config does not fit in it "
                                    f"(lower d or batch_size, or narrow the space): {type(exc).__name__}: {exc}")
            self.reported_error = True
            return {TRIAL_ERROR: f"{type(self.error).__name__}: {self.error}"}
        self.fault = (OUT_OF_MEMORY, exc)
        return self._report_fault()

    def _report_fault(self) -> dict:
        """A fault of the trial's place: reported as a result once (the driver then lets Ray retry
        it without counting it against --max-retries), then raised."""
        key, error = self.fault
        if not self.fault_reported:
            self.fault_reported = True
            return {key: f"{type(error).__name__}: {str(error)[:1000]}", "gpu_share": self.gpu_share or 0.0,
                    "node_id": ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""}
        if key == OUT_OF_MEMORY:
            time.sleep(self.oom_backoff_s * (1 + random.random()))
        raise error

    def _epoch(self) -> dict:
        record = self.trainer.step()
        cfg = self.cmath_config
        every = cfg.checkpoint_every
        epoch = self.trainer.epoch
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        classes = self.dataset.classes
        for split in ("val", "test"):
            numbers.update({f"{split}_f1_{name}": f1 for name, f1 in zip(classes, record[f"{split}_per_class_f1"])})
        numbers.update(best_val_wf1=self.trainer.best["val_wf1"], best_epoch=self.trainer.best["epoch"],
                       setup_seconds=self.setup_seconds, checkpoint_seconds=self.checkpoint_seconds)
        result = {k: numbers.pop(k) for k in SCHEDULING_KEYS}
        result.update(
            {DETAILS: json.dumps(numbers)},
            # which machine ran it (table column `nodes`); none outside Ray (tests/test_trainable.py)
            node_id=ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
            epochs_planned=cfg.epochs,
            should_checkpoint=(epoch >= cfg.epochs or epoch in self.checkpoint_epochs
                               or bool(every and epoch % every == 0)),
            done=epoch >= cfg.epochs,
        )
        self.last_result = result
        self.reported.append({"epoch": epoch, **model_metrics(result), "node": result["node_id"][:12],
                              "pid": os.getpid(), "received_at": time.time()})
        return result

    def save(self, checkpoint_dir: str | None = None):
        started = time.perf_counter()
        saved = super().save(checkpoint_dir)  # save_checkpoint, then Ray's copy to the trial's storage
        self.checkpoint_seconds += time.perf_counter() - started
        return saved

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        final = self.trainer.epoch >= self.cmath_config.epochs
        info = {"epoch": self.trainer.epoch, "final": final}
        if final:
            info["result"] = final_result(self.last_result)
        elif self.cmath_config.checkpoint_every:
            self.trainer.save(Path(checkpoint_dir) / "trainer")
        if self.trainer.best is not None:
            self.trainer.save_best(Path(checkpoint_dir) / "best")
        (Path(checkpoint_dir) / CHECKPOINT_HISTORY).write_text("".join(json.dumps(r) + "\n" for r in self.reported))
        (Path(checkpoint_dir) / CHECKPOINT_FILE).write_text(json.dumps(info))

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        info = json.loads((Path(checkpoint_dir) / CHECKPOINT_FILE).read_text())
        history = Path(checkpoint_dir) / CHECKPOINT_HISTORY
        if history.exists():  # a checkpoint from before histories were kept has none
            self.reported = [json.loads(line) for line in history.read_text().splitlines() if line]
        if info.get("final"):  # the trial had finished: replay its last result (see step)
            self.ended = {"end_state": "completed", "result": info["result"]}
            return
        if not (Path(checkpoint_dir) / "trainer").exists():
            raise FileNotFoundError("no resume state in it (checkpoint_every 0 writes none)")
        self.trainer.load(Path(checkpoint_dir) / "trainer")
        if (Path(checkpoint_dir) / "best").exists():
            self.trainer.load_best(Path(checkpoint_dir) / "best")

    def restore(self, checkpoint_path) -> None:
        """Tune's restore, made to survive what a killed driver or a bad disk leaves behind.

        A trial the driver saw end (see read_ended) is not trained again: its final result is
        replayed. Otherwise the trial's checkpoints are tried newest first, the one Ray names
        among them: Ray's saved state can lag a killed driver and name an older checkpoint, or
        one since deleted, and a checkpoint can be corrupt; so no epoch is trained twice beyond
        the newest usable checkpoint. With none usable the trial starts over. How it came back,
        when that is not from the checkpoint Ray named, is reported with the next result
        (RESTORE_NOTE)."""
        if not isinstance(checkpoint_path, TrainingResult):
            return super().restore(checkpoint_path)
        self.carries_on = None  # Ray has a checkpoint of this trial itself: no need for the lost one's
        self.unrestored = False
        if self.ended is not None:
            return None
        wanted = checkpoint_path.checkpoint
        fs, trial_dir = wanted.filesystem, wanted.path.rstrip("/").rsplit("/", 1)[0]
        paths = _checkpoints_newest_first(fs, trial_dir, named=wanted.path)
        loaded, problems = self._load_first_usable(fs, paths, checkpoint_path.metrics, own=True)
        if loaded and self.restored_from.rstrip("/") != wanted.path.rstrip("/"):
            named = wanted.path.rstrip("/").rsplit("/", 1)[-1]
            problems.append(f"Ray's saved state named {named}")
        if loaded and problems:
            self.restore_note = f"{'; '.join(problems)}; resumed from {loaded}"
        if not loaded:
            self.restore_note = f"{'; '.join(problems) or 'no checkpoint found'}; restarted from epoch 1"
        return None

    def _load_first_usable(self, fs: pafs.FileSystem, paths: list[str], metrics: dict,
                           own: bool = False) -> tuple[str | None, list[str]]:
        """Load the first of `paths` that works; say which (name and epoch) and what was wrong
        with those before it. With none usable the trial starts over: a new trainer (a checkpoint
        that failed half-way may have loaded part of its state) and Tune's epoch count back at 0.
        `own`: the paths are in this trial's folder, whose next checkpoint then gets a number after
        the loaded one."""
        problems = []
        for path in paths:
            name = path.rsplit("/", 1)[-1]
            try:
                epoch = (read_json(fs, f"{path}/{CHECKPOINT_FILE}") or {})["epoch"]
                candidate = tune.Checkpoint(path, filesystem=fs)
                super().restore(TrainingResult(checkpoint=candidate, metrics={**metrics, "training_iteration": epoch}))
            except Exception as exc:  # missing, unreadable or corrupt: try the next one
                problems.append(f"{name} unusable ({type(exc).__name__}: {str(exc)[:120]})")
                continue
            self.restored_from = path
            if own:
                number_checkpoints_after(self, int(name.rpartition("_")[2]))
            return f"{name} (epoch {epoch})", problems
        self._start(self.config)
        restart_iteration_count(self)
        return None, problems

    def _carry_on(self, lost: str) -> None:
        """A trial that carries on one a killed driver lost (hpo.search.SweepSearch) starts from
        the newest usable checkpoint that one left in storage, or, with none, from epoch 1. Done
        at its first step, not in setup: when Ray restores the trial from a checkpoint of its
        own (a lost worker, a second resume), restore comes between and this is skipped."""
        self.carries_on = None
        self.unrestored = False  # its own folder is new: nothing there to resume from
        if self.ended is not None or self.error is not None:
            return
        fs, paths = lost_trial_checkpoints(self.ended_dir, lost)
        loaded, problems = self._load_first_usable(fs, paths, {})
        where = f"from {loaded}" if loaded else f"from epoch 1 ({'; '.join(problems) or 'it left no checkpoint'})"
        self.restore_note = (f"carries on trial {lost}, which started after Ray last saved its state before the "
                             f"driver was killed, {where}")

    def _resume_from_storage(self) -> None:
        """A trial Ray starts without a checkpoint resumes from its newest usable one on the
        storage, if it has any: Ray's saved state lags a killed driver and can know the trial but
        not its checkpoints (Tune's snapshots wait in proportion to their size, hpo.tuner). A new
        trial has none. Done at its first step, like _carry_on."""
        self.unrestored = False
        folder = trial_folder(self)
        if folder is None or self.ended is not None or self.error is not None:
            return
        fs, trial_dir = folder
        paths = checkpoint_folders(fs, trial_dir)
        if not paths:
            return
        loaded, problems = self._load_first_usable(fs, paths, {}, own=True)
        where = f"resumed from {loaded}" if loaded else "restarted from epoch 1"
        self.restore_note = "; ".join([*problems, f"Ray's saved state knew none of its checkpoints; {where}"])

    def reset_config(self, new_config: dict) -> bool:
        self._start(new_config)
        self.carries_on = new_config.get(CHECKPOINTS_OF)
        self.unrestored = True
        self._check_storage()
        return True

    def drop_trainer(self) -> None:
        """Free the previous trial's model and optimiser before the next is built: otherwise a
        reused worker holds both at once, and on a shared GPU the cache keeps its high-water mark."""
        self.trainer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def gpu_memory_share(assigned: dict[str, float]) -> float | None:
    """The share of its GPU's memory a trial packed with others (`--gpus-per-trial 0.25`) may use:
    its share of the GPU. Without a cap, one trial's allocator cache can starve its neighbours.
    None for a trial with a whole GPU or none.

    Args:
        assigned: the resources Ray assigned the trial (`get_assigned_resources()`).
    """
    share = float(assigned.get("GPU", 0.0))
    return share if 0.0 < share < 1.0 else None


# How an allocation failure on the GPU reads when it does not arrive as torch's OutOfMemoryError:
# cuBLAS and cuDNN report theirs through RuntimeError.
OUT_OF_MEMORY_SIGNS = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                       "CUDA error: out of memory")


def out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is the GPU running out of memory (whatever library raised it)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(sign in str(exc) for sign in OUT_OF_MEMORY_SIGNS))


def final_result(result: dict) -> dict:
    """What a replay of an ended trial needs of its last result (numbers and text, no Tune flags)."""
    return {k: v for k, v in result.items()
            if isinstance(v, (int, float, str))
            and k not in ("done", "should_checkpoint", REPLAYED, ENDED_CHECKPOINT, ENDED_AT, RESTORE_NOTE)}


def _checkpoints_newest_first(fs: pafs.FileSystem, trial_dir: str, named: str) -> list[str]:
    """The trial's checkpoints, newest first, with `named` (the one Ray names) among them even if
    the folder listing misses it."""
    found = checkpoint_folders(fs, trial_dir)
    if named.rstrip("/") in (p.rstrip("/") for p in found):
        return found
    return [*found, named]


def lost_trial_checkpoints(ended_dir: str, trial_id: str) -> tuple[pafs.FileSystem, list[str]]:
    """A Ray trial's checkpoints, newest first, from its folder in the experiment folder (where
    the ended records are too)."""
    fs, ended = pafs.FileSystem.from_uri(ended_dir)
    folders = trial_folders(fs, ended.rstrip("/").rsplit("/", 1)[0], trial_id)
    return fs, [path for folder in folders for path in checkpoint_folders(fs, folder)]
