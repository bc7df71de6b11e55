"""Trial workers killed by PID mid-trial, one of them after its newer checkpoints were corrupted:
each trial resumes from a checkpoint (not from epoch 1), keeps its one MLflow run, and its
metric history has every epoch exactly once."""

import os
import signal
import threading
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.tune import ExperimentAnalysis

from cmath_model.tracking import default_tracking_uri
from hpo.sweep import SweepOptions, run_sweep
from hpo.trials import read_journal, read_trials

EPOCHS = 12
SPACE = {
    "dataset": "iemocap",
    "search": {"d": {"type": "categorical", "choices": [256]},
               "lr": {"type": "loguniform", "low": 5.0e-4, "high": 2.0e-3}},
    "fixed": {"epochs": EPOCHS, "batch_size": 4, "checkpoint_every": 2},
    "asha": {"grace_period": EPOCHS},
}


def _running(ray_dir):
    """{trial folder: (worker pid, last epoch, checkpoint folders)} of the trials still running,
    from the sweep's journal (written as each result arrives; the tables lag by up to 10 s)."""
    found = {}
    for trial_id, results in read_journal(ray_dir.parent).items():
        folders = list(ray_dir.glob(f"*_{trial_id}_*"))
        if results[-1]["epoch"] < EPOCHS and folders:
            found[folders[0].name] = (results[-1]["pid"], results[-1]["epoch"],
                                      sorted(folders[0].glob("checkpoint_*")))
    return found


def _settled_checkpoints(ray_dir, name, keep=2, timeout=10.0):
    """The paused trial's checkpoints once the driver can delete none of them, or None if it was
    paused where that cannot be told (it is then let go on, and paused again later).

    Ray keeps `keep` (CheckpointConfig.num_to_keep) and deletes the oldest when it registers a
    newer one. The driver journals an epoch's result before it asks for that epoch's checkpoint,
    and starts the next epoch only once it has registered it. So if the last epoch journaled
    after the pause took no checkpoint, none is on its way: at most `keep` are on disk, for good.
    After an epoch that took one, the worker may have been paused before it reported it (then the
    driver deletes nothing) or after (then it deletes the oldest): nothing on disk tells which."""
    epoch = _running(ray_dir).get(name, (None, EPOCHS))[1]
    if epoch % SPACE["fixed"]["checkpoint_every"] == 0 or epoch >= EPOCHS:
        return None
    deadline = time.monotonic() + timeout
    while len(checkpoints := sorted((ray_dir / name).glob("checkpoint_*"))) > keep:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} paused after epoch {epoch} still has {[c.name for c in checkpoints]} "
                                 f"after {timeout:.0f}s, more than the {keep} Ray keeps")
        time.sleep(0.05)
    return checkpoints


def _inject(ray_dir, done, events, errors):
    """Kill the first trial's worker; corrupt the second one's checkpoints, all but its oldest,
    then kill it.

    The second worker is paused (SIGSTOP) before its checkpoints are touched: a checkpoint on
    disk may not have reached the driver yet, and which one Ray names on restore is whichever
    it had registered. Paused, the worker sends nothing more, and once the driver has deleted
    what it will (_settled_checkpoints; a worker paused where that cannot be told is let go on),
    corrupting every checkpoint but the oldest makes the named one unusable whichever it is, and
    the oldest is the one left."""
    deadline = time.monotonic() + 240
    victims = {}
    while time.monotonic() < deadline and len(victims) < 2 and not done.is_set():
        for name, (pid, epoch, checkpoints) in _running(ray_dir).items():
            if name in victims or epoch < 5 or epoch > EPOCHS - 3 or len(checkpoints) < 2:
                continue
            corrupt = len(victims) == 1
            corrupted = []
            if corrupt:
                os.kill(pid, signal.SIGSTOP)
                try:
                    checkpoints = _settled_checkpoints(ray_dir, name)
                except AssertionError as exc:  # the test fails on it; the sweep goes on without a paused worker
                    os.kill(pid, signal.SIGKILL)
                    errors.append(str(exc))
                    return
                if checkpoints is None:
                    os.kill(pid, signal.SIGCONT)
                    continue
                for checkpoint in checkpoints[1:]:
                    if (checkpoint / "trainer").is_dir():
                        (checkpoint / "trainer" / "trainer.pt").write_bytes(b"not a checkpoint")
                        corrupted.append(checkpoint.name)
            os.kill(pid, signal.SIGKILL)
            victims[name] = {"pid": pid, "epoch": epoch, "corrupted": corrupted,
                             "kept": checkpoints[0].name if corrupt else None}
            break
        time.sleep(0.05)
    events.update(victims)


@pytest.mark.slow
def test_killed_workers_resume_from_checkpoints(tmp_path, tiny_path, shared_ray):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    results = tmp_path / "results"
    done, victims, errors, lines = threading.Event(), {}, [], []
    injector = threading.Thread(target=_inject, args=(results / "kill" / "ray", done, victims, errors))
    injector.start()
    try:
        outcome = run_sweep(SweepOptions(space=space, data=str(tiny_path), num_samples=4, max_concurrent=2,
                                         num_cpus=2, results=results, name="kill", max_retries=2),
                            log=lines.append)
    finally:
        done.set()
        injector.join(timeout=60)  # its own waits are bounded; this bounds the rest
    assert not injector.is_alive(), "the fault injector did not stop within 60 s of the sweep's end"
    assert not errors, errors[0]
    assert len(victims) == 2, f"could not catch two trials mid-run: {victims}"
    assert sum(bool(victim["corrupted"]) for victim in victims.values()) == 1, victims
    assert outcome.status == "finished" and outcome.counts["completed"] == 4

    trials = read_trials(results / "kill")
    analysis = {t.trial_id: t for t in ExperimentAnalysis(str(results / "kill" / "ray")).trials}
    client = MlflowClient(default_tracking_uri(results))
    for name, victim in victims.items():
        row = trials[[t in name for t in trials["trial_id"]]].iloc[0]
        assert row["end_state"] == "completed" and row["restarts"] == 1
        assert analysis[row["trial_id"]].run_metadata.num_failures == 1
        epochs = [r["epoch"] for r in read_journal(results / "kill")[row["trial_id"]]]
        assert epochs.count(1) == 1, f"restarted from scratch: {epochs}"
        assert sorted(set(epochs)) == list(range(1, EPOCHS + 1))
        assert row["epochs_redone"] == len(epochs) - EPOCHS
        history = client.get_metric_history(row["mlflow_run_id"], "val_wf1")
        assert [m.step for m in history] == list(range(1, EPOCHS + 1))  # no gap, no repeat
        run = client.get_run(row["mlflow_run_id"])
        if victim["corrupted"]:
            note = run.data.tags["cmath.restore_note"]
            assert any(f"{name} unusable" in note for name in victim["corrupted"]), note
            assert f"resumed from {victim['kept']}" in note, note
            assert note in row["restore_notes"]
            assert any(f"resumed from {victim['kept']}" in line for line in lines)
        print(f"{name}: killed at epoch {victim['epoch']}, epochs redone {row['epochs_redone']}")
    runs = client.search_runs([client.get_experiment_by_name("kill").experiment_id],
                              filter_string="tags.`cmath.kind` = 'trial'")
    assert len(runs) == 4
    assert sum("lost its worker" in line for line in lines) == 2
