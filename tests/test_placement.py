"""Faults of a trial's place, not of its config (hpo.placement), injected into real sweeps on a
real Ray (one for the module, as a notebook's ray.init(); the sweeps run on it): a trial out of
its share of a GPU is retried on its own budget, and a config that keeps running out fails; the
storage failing on the only node stops the sweep, resumable, with one `error:` line; a node that
dies during the preflight is not a node without the storage. (A node that joins late and cannot
use the storage: tests/test_cluster.py.)"""

import json
import sys
from pathlib import Path

import optuna
import pytest
import ray
import torch
import yaml
from ray.tune.execution.placement_groups import PlacementGroupFactory

from hpo.placement import OOM_RETRIES, avoiding
from hpo.resume import resume_sweep
from hpo.sweep import SweepOptions, run_sweep
from hpo.trainable import CMATHTrial
from hpo.trials import read_trials

SPACE = {
    "dataset": "iemocap",
    "search": {"d": {"type": "categorical", "choices": [32, 48]}},
    "fixed": {"epochs": 3, "batch_size": 4, "checkpoint_every": 1},
    "warm_start": [{"d": 32}, {"d": 48}],
    "asha": {"grace_period": 3},
}


def _attempt(folder: str, trial_id: str) -> int:
    """How many times this trial has come here before (a file per trial, across its workers)."""
    path = Path(folder) / trial_id
    seen = int(path.read_text()) if path.exists() else 0
    path.write_text(str(seen + 1))
    return seen


class OutOfMemoryTrial(CMATHTrial):
    """Placed as if in half a GPU; out of memory in epoch 2: d 32 once, d 48 every time."""

    faults_dir = ""

    def setup(self, config, **kwargs):
        super().setup(config, **kwargs)
        self.gpu_share, self.oom_backoff_s = 0.5, 0.2

    def _epoch(self) -> dict:
        if self.trainer.epoch == 1 and (_attempt(self.faults_dir, self.trial_id) == 0 or self.cmath_config.d == 48):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return super()._epoch()


class StorageGoneTrial(CMATHTrial):
    """The first trial's probe reads a marker other than the driver's, as on a node that sees
    another disk (the real probe, against the real storage)."""

    faults_dir = ""

    def _check_storage(self) -> None:
        if self.probe and _attempt(self.faults_dir, "probe") == 0:
            self.probe = (self.probe[0], "not-the-drivers-token")
        super()._check_storage()


# Ray's workers cannot import the tests folder: ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(autouse=True)
def _on_this_processs_ray(shared_ray):
    """Every test here runs on one Ray of this process, as after a notebook's ray.init()."""


def _space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return path


def test_avoiding_keeps_the_bundles_and_rules_out_the_nodes():
    asked = PlacementGroupFactory([{"CPU": 1.0, "GPU": 0.5}])
    kept_off = avoiding(asked, ["a" * 56, "b" * 56])
    assert kept_off.bundles == asked.bundles and kept_off.strategy == asked.strategy
    assert kept_off != asked
    assert avoiding(kept_off, []) == asked  # a resume starts with no node excluded


def test_a_node_that_dies_during_the_preflight_is_not_taken_for_one_without_the_storage(tmp_path, monkeypatch):
    """Ray lists a node as alive until its health checks give up on it (seconds after a kill): the
    preflight's check pinned there then fails, not for the storage. A fresh-clone CI run refused
    the late-node test that way, on the worker node the test before it had killed. Here the dead
    node is one that Ray lists once and never had."""
    from hpo.storage import check_storage_on_every_node

    real = ray.nodes
    calls = []

    def listed_with_a_dead_node():
        calls.append(1)
        nodes = real()
        return nodes + [{**nodes[0], "NodeID": "ab" * 28}] if len(calls) == 1 else nodes

    monkeypatch.setattr(ray, "nodes", listed_with_a_dead_node)
    assert check_storage_on_every_node(str(tmp_path / "storage")) < 60  # no SweepError naming node abab...


@pytest.mark.slow
def test_out_of_memory_in_a_share_of_a_gpu_is_retried_on_its_own_budget(tmp_path, tiny_path):
    """--max-retries 0: every retry here is the out-of-memory budget's. Before hpo.placement, the
    first out of memory ended each trial (Ray's retries were spent) and Optuna was told FAIL."""
    OutOfMemoryTrial.faults_dir = str(tmp_path)
    lines = []
    outcome = run_sweep(SweepOptions(space=_space(tmp_path), data=str(tiny_path), num_samples=2, max_concurrent=2,
                                     num_cpus=2, max_retries=0, results=tmp_path / "results", name="oom"),
                        log=lines.append, trainable=OutOfMemoryTrial)
    trials = read_trials(tmp_path / "results" / "oom").set_index("param_d")
    text = "\n".join(lines)
    assert trials.loc[32, "end_state"] == "completed" and trials.loc[32, "restarts"] == 1
    assert trials.loc[48, "end_state"] == "failed" and "OutOfMemoryError" in trials.loc[48, "error"]
    assert trials.loc[48, "restarts"] == OOM_RETRIES
    study = optuna.load_study(study_name="oom", storage=f"sqlite:///{tmp_path / 'results' / 'oom' / 'optuna.db'}")
    states = {t.params["d"]: t.state.name for t in study.trials}
    assert states == {32: "COMPLETE", 48: "FAIL"}
    assert text.count("ran out of memory in its 0.5 of a GPU (1/3); retried") == 2
    assert "ran out of memory in its 0.5 of a GPU 3 times: taken as a config that does not fit" in text
    assert outcome.exit_code == 0  # one trial completed; the failed one is a config's failure
    # It ran on this process's Ray and left it running, for the next sweep (and recorded it as not its own).
    assert ray.is_initialized() and "ray: this process's Ray (ray.init)" in text
    assert json.loads((tmp_path / "results" / "oom" / "sweep.json").read_text())["driver"]["private_ray"] is False


@pytest.mark.slow
def test_storage_failing_on_the_only_node_stops_the_sweep_resumably(tmp_path, tiny_path):
    StorageGoneTrial.faults_dir = str(tmp_path)
    lines = []
    outcome = run_sweep(SweepOptions(space=_space(tmp_path), data=str(tiny_path), num_samples=2, max_concurrent=1,
                                     num_cpus=1, max_retries=0, results=tmp_path / "results", name="gone"),
                        log=lines.append, trainable=StorageGoneTrial)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "cannot use the sweep's storage" in errors[0], lines
    assert "reads a different marker than the driver wrote" in errors[0] and "`cmath-hpo resume`" in errors[0]
    assert outcome.status == "incomplete" and outcome.counts["failed"] == 0
    [(node, fault)] = outcome.node_faults.items()
    assert fault["faults"] == 1 and not fault["excluded"]
    assert outcome.exit_code == 1
    assert f"node {node[:12]} could not use the sweep's storage" in lines[-1]  # the summary
    study = optuna.load_study(study_name="gone", storage=f"sqlite:///{tmp_path / 'results' / 'gone' / 'optuna.db'}")
    # Not told FAIL: `resume` carries the first trial on (the second is the warm start's, still queued).
    assert [t.state.name for t in study.trials] == ["RUNNING", "WAITING"]

    # The storage is back (the injection was once): the resume finishes both trials, none twice.
    resumed = resume_sweep("gone", tmp_path / "results", log=lines.append, trainable=StorageGoneTrial)
    assert resumed.status == "finished" and resumed.counts["completed"] == 2
    trials = read_trials(tmp_path / "results" / "gone")
    assert sorted(trials["param_d"]) == [32, 48] and set(trials["end_state"]) == {"completed"}
