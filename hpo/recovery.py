"""What lets a sweep outlive a failure: the records a trial leaves when it ends, the result keys
a trial and the driver use to tell each other how a trial failed or came back, and the driver's
rules for retries, and how a trial a killed driver lost is carried on.

A trial that raised its own error (a bad config, a NaN loss) is not retried: retries are for lost
workers and nodes (`NoRetryOnTrialError`). A trial that ended is recorded in storage beside Ray's
experiment (`write_ended`), because Ray's saved state can lag a killed driver; on a resume such a
trial replays its final result instead of training again (CMATHTrial.restore). A trial that
started after Ray's last saved state is unknown to it altogether: a resume hands it out again
(SweepSearch), as a new Ray trial that keeps its id in the sweep's records (`trial_key`) and
starts from its checkpoints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.fs as pafs
from ray.tune import Callback
from ray.tune.experiment import Trial

from ._compat import never_retry

TRIAL_ERROR = "cmath_error"  # a result key: the trial raised; the driver must not retry it
# Result keys for a fault of where a trial runs, not of its config (hpo.placement decides how it is
# retried): its node cannot use the sweep's storage; it ran out of its share of a GPU.
STORAGE_FAULT = "cmath_storage_fault"
OUT_OF_MEMORY = "cmath_out_of_memory"
RESTORE_NOTE = "cmath_restore_note"  # a result key: how the trial came back after a restore
REPLAYED = "cmath_replayed"  # a result key: an ended trial's final result, repeated after a restore
ENDED_CHECKPOINT = "cmath_ended_checkpoint"  # with REPLAYED: the path of the checkpoint the trial ended with
ENDED_AT = "cmath_ended_at"  # with REPLAYED: when the trial ended (time.time())
# A result key: the checkpoint (a path on the sweep's storage) a trial came back from after a
# restore, whose history (CHECKPOINT_HISTORY) holds the trial's epochs up to it: a resumed driver
# whose journal lags (another host, a mirror) takes those it lacks from there.
RESTORED_FROM = "cmath_restored_from"
CHECKPOINT_HISTORY = "history.jsonl"  # in each checkpoint: one line per epoch the trial reported
# ENDED_FOLDER (hpo.plan): in the experiment's storage folder, <trial_id>.json written when a trial ends
# In the config of a trial that carries on one a killed driver lost (SweepSearch hands these out
# first on a resume): the lost trial's id, which its table row, MLflow run and ended record keep,
# and the Ray trial whose checkpoints it starts from (the same, unless that one was lost too).
CONTINUES = "cmath_continues"
CHECKPOINTS_OF = "cmath_checkpoints_of"
LOST = "lost: started after Ray last saved its state, then the driver was killed; a resume carries it on"
MAX_ERROR_CHARS = 500


def is_epoch(result: dict) -> bool:
    """Whether a trial's result is an epoch's numbers, not a report of its error or of a fault."""
    return not any(key in result for key in (TRIAL_ERROR, STORAGE_FAULT, OUT_OF_MEMORY))


def trial_key(trial) -> str:
    """The id a trial has in the sweep's tables, MLflow and ended records: Ray's, or that of the
    lost trial it carries on."""
    return trial.config.get(CONTINUES) or trial.trial_id


def searched_config(config: dict) -> dict:
    """A trial's config without the keys that say which lost trial it carries on."""
    return {k: v for k, v in config.items() if k not in (CONTINUES, CHECKPOINTS_OF)}


def error_text(trial: Trial) -> str:
    """A failed trial's traceback, from Ray's error file ("" when there is none)."""
    path = trial.error_file
    return Path(path).read_text(errors="replace") if path and Path(path).exists() else ""


def error_summary(trial: Trial) -> str:
    """The exception line of a failed trial (Ray's error file holds the whole traceback)."""
    lines = [line.strip() for line in error_text(trial).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line):
            return line[:MAX_ERROR_CHARS]
    return (lines[-1] if lines else "unknown error")[:MAX_ERROR_CHARS]


def ended_marker(ended_dir: str, trial_id: str) -> tuple[pafs.FileSystem, str]:
    fs, root = pafs.FileSystem.from_uri(ended_dir)
    return fs, f"{root.rstrip('/')}/{trial_id}.json"


def read_ended(ended_dir: str, trial_id: str) -> dict | None:
    return read_json(*ended_marker(ended_dir, trial_id))


def write_ended(ended_dir: str, trial_id: str, record: dict) -> None:
    fs, path = ended_marker(ended_dir, trial_id)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(json.dumps(record).encode())


def read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def read_lines(fs: pafs.FileSystem, path: str) -> list[dict]:
    """A file of JSON lines on a storage; [] when it is missing or unreadable, without a line cut short."""
    try:
        with fs.open_input_stream(path) as stream:
            text = stream.read().decode()
    except (FileNotFoundError, OSError):
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class NoRetryOnTrialError(Callback):
    """Retries are for lost workers and nodes. A trial that reported TRIAL_ERROR raises on its
    next step; with no retries left, Ray records it as ERROR once instead of re-running it."""

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info) -> None:
        if TRIAL_ERROR in result:
            never_retry(trial)
