"""A trial's checkpoints: which checkpoint it ended with, and what of it is kept once it has
ended. (Where ASHA may stop a trial, so that it checkpoints there, is part of the plan:
hpo.plan.asha_rungs.)"""

from __future__ import annotations

import pyarrow.fs as pafs
from ray.tune.experiment import Trial

from .recovery import ENDED_CHECKPOINT
from .storage import full_uri


def trial_folders(fs: pafs.FileSystem, experiment: str, trial_id: str) -> list[str]:
    """A Ray trial's folders in the experiment folder, found by its id: Ray names each
    `<trainable>_<trial id>_<number>_...`."""
    return [info.path for info in fs.get_file_info(pafs.FileSelector(experiment, allow_not_found=True))
            if info.type == pafs.FileType.Directory and f"_{trial_id}_" in info.base_name]


def checkpoint_folders(fs: pafs.FileSystem, trial_dir: str) -> list[str]:
    """A Ray trial folder's checkpoints, newest first: Ray numbers them in order, zero-padded
    (`checkpoint_000012`)."""
    return sorted((info.path for info in fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
                   if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_")),
                  reverse=True)


def last_checkpoint(trial: Trial) -> tuple[pafs.FileSystem, str] | None:
    """The filesystem and path of the trial's latest checkpoint. A replayed trial's is the one
    recorded when it really ended: the Ray state a resume restores can lag behind a killed
    driver and name an older checkpoint, which the pruner deleted when the trial ended."""
    recorded = (trial.last_result or {}).get(ENDED_CHECKPOINT)
    if recorded:  # a path on the sweep's storage, whose filesystem (endpoint, credentials) the trial holds
        return trial.storage.storage_filesystem, recorded
    if trial.checkpoint is None:
        return None
    return trial.checkpoint.filesystem, trial.checkpoint.path.rstrip("/")


def checkpoint_uri(trial: Trial, query: str = "") -> str | None:
    """Where the trial's best/ lies, as a path or a full URI (s3://...?query), for the tables and
    exports; `query`: the storage's own (hpo.storage.public_query), e.g. its endpoint."""
    checkpoint = last_checkpoint(trial)
    return None if checkpoint is None else full_uri(checkpoint[0], f"{checkpoint[1]}/best", query)


def prune_checkpoints(checkpoint: tuple[pafs.FileSystem, str] | None, carried_on: str | None = None) -> None:
    """When a trial has ended, only its best-validation weights can still matter: nothing resumes
    a finished, stopped or failed trial. Delete its resume state (`trainer/`: model plus Adam
    state, ~240 MB at d 500) and its older checkpoints, and those of the lost trial it carried
    on, if any (`carried_on`: that trial's Ray id); keep the latest `best/`."""
    if checkpoint is None:
        return
    fs, path = checkpoint
    trial_dir = path.rsplit("/", 1)[0]
    folders = [trial_dir] + (trial_folders(fs, trial_dir.rsplit("/", 1)[0], carried_on) if carried_on else [])
    for folder in dict.fromkeys(folders):
        for older in checkpoint_folders(fs, folder):
            if older.rstrip("/") != path:
                fs.delete_dir(older)
    if fs.get_file_info(f"{path}/trainer").type == pafs.FileType.Directory:
        fs.delete_dir(f"{path}/trainer")
