"""One sweep trial as a Ray Tune class trainable over cmath_model's Trainer.

A class (not a function) so Ray can reuse a trial's worker process for the next trial
(`reset_config`) instead of paying for a new process and its imports each time.

Every checkpoint holds two folders: `trainer/` (everything needed to resume the run exactly)
and `best/` (the best-validation epoch so far: weights, config, test predictions, metrics,
which is what MLflow receives and `cmath-eval` loads). A checkpoint is written when validation
improves and every `checkpoint_every` epochs, so the latest checkpoint always has the best.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ray import tune

from cmath_model.config import from_dict
from cmath_model.data import Dataset
from cmath_model.train import LOSS_KEYS, Trainer

SCORE_KEYS = ("val_acc", "val_wf1", "test_acc", "test_wf1")
TIMING_KEYS = ("train_seconds", "epoch_seconds")
BEST_KEYS = ("best_val_wf1", "best_epoch")
PER_CLASS_PREFIXES = ("val_f1_", "test_f1_")


def model_metrics(result: dict) -> dict[str, float]:
    """The model's own per-epoch numbers in a Tune result, without Ray's bookkeeping keys."""
    keep = set(LOSS_KEYS) | set(SCORE_KEYS) | set(TIMING_KEYS) | set(BEST_KEYS)
    return {k: float(v) for k, v in result.items()
            if (k in keep or k.startswith(PER_CLASS_PREFIXES)) and isinstance(v, (int, float))}


TRIAL_ERROR = "cmath_error"  # a result key: the trial raised; the driver must not retry it


class CMATHTrial(tune.Trainable):
    """`config` holds the searched values; `base` (the sweep's fixed config) and `dataset`
    arrive once through the object store via `tune.with_parameters`.

    Ray retries every failed trial alike, but only a lost worker deserves a retry: a trial that
    raised (a bad config, a NaN loss) would fail again. So an error is first reported as a
    result carrying TRIAL_ERROR, on which the driver turns retries off for this trial
    (hpo.table.NoRetryOnTrialError), and then raised on the next step, so Ray records the
    trial as ERROR with the real exception."""

    def setup(self, config: dict, base: dict | None = None, dataset: Dataset | None = None) -> None:
        self.base = base or {}
        self.dataset = dataset
        self._start(config)

    def _start(self, params: dict) -> None:
        self.error: Exception | None = None
        self.reported_error = False
        self.best_dir = Path(self.logdir) / "best"
        shutil.rmtree(self.best_dir, ignore_errors=True)
        try:
            self.cmath_config = from_dict({**self.base, **params}, source="trial config")
            self.trainer = Trainer(self.cmath_config, self.dataset)
        except Exception as exc:  # raised from step(), after the driver knows
            self.error = exc

    def step(self) -> dict:
        if self.error is not None:
            if self.reported_error:
                raise self.error
            self.reported_error = True
            return {TRIAL_ERROR: f"{type(self.error).__name__}: {self.error}"}
        try:
            return self._epoch()
        except Exception as exc:
            self.error = exc
            self.reported_error = True
            return {TRIAL_ERROR: f"{type(exc).__name__}: {exc}"}

    def _epoch(self) -> dict:
        record = self.trainer.step()
        if self.trainer.improved:
            self.trainer.save_best(self.best_dir)
        cfg = self.cmath_config
        every = cfg.checkpoint_every
        result = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        classes = self.dataset.classes
        for split in ("val", "test"):
            result.update({f"{split}_f1_{name}": f1 for name, f1 in zip(classes, record[f"{split}_per_class_f1"])})
        result.update(
            best_val_wf1=self.trainer.best["val_wf1"],
            best_epoch=self.trainer.best["epoch"],
            epochs_planned=cfg.epochs,
            should_checkpoint=self.trainer.improved or bool(every and self.trainer.epoch % every == 0),
            done=self.trainer.epoch >= cfg.epochs,
        )
        return result

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        self.trainer.save(Path(checkpoint_dir) / "trainer")
        if self.best_dir.exists():
            shutil.copytree(self.best_dir, Path(checkpoint_dir) / "best")

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        self.trainer.load(Path(checkpoint_dir) / "trainer")
        shutil.rmtree(self.best_dir, ignore_errors=True)
        if (Path(checkpoint_dir) / "best").exists():
            shutil.copytree(Path(checkpoint_dir) / "best", self.best_dir)

    def reset_config(self, new_config: dict) -> bool:
        self._start(new_config)
        return True
