"""Where a sweep's trials run, and what a fault of the place, not of the config, does.

Two faults say nothing about a trial's config, so they do not count against its retries
(`--max-retries`, which are for lost workers and nodes) and never reach Optuna as failures:

- **A node that cannot use the sweep's storage.** The preflight checks every node there is when
  the sweep starts; a node that joins later (an autoscaler, a replaced machine) is checked by each
  trial before it trains (CMATHTrial's probe). A trial that finds its node cannot is retried
  elsewhere; after `STORAGE_FAULTS_TO_EXCLUDE` such faults the node gets no more trials of this
  sweep. With no other node left to go to, the storage itself is what fails: the sweep stops as
  after Ctrl-C, every trial resumable, for a `resume` once the storage is back.
- **A trial out of its share of a GPU** (`--gpus-per-trial` below 1; the trial backs off before
  it is retried). After `OOM_RETRIES` retries, the config is taken not to fit in the share: the
  trial fails, and Optuna is told so. A trial with a GPU of its own that runs out fails at once
  (CMATHTrial), as nothing else shares its memory.

Tune has no per-node control of where trials go, so the sweep's scheduler (ASHA or FIFO, with
`AvoidsFaultyPlaces` mixed in) keeps trials off excluded nodes: their placement groups get a
label selector on Ray's `ray.io/node-id` label. Tune lets a trial's resources change while it is
not running; the scheduler hears of a trial at two such moments, when it is added and when it
failed (before it is queued again), and sets the selector there. Tune saves no scheduler state:
a resumed sweep's preflight checks every node again, and the exclusions start over.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from ray.tune.execution.placement_groups import PlacementGroupFactory
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ._compat import allow_another_try, asha_brackets, bracket_rungs, never_retry
from .cluster import nodes_that_fit
from .record import NODE_FAULTS_FILE, read_node_faults, write_json
from .recovery import CONTINUES, OUT_OF_MEMORY, STORAGE_FAULT, trial_key

STORAGE_FAULTS_TO_EXCLUDE = 2
OOM_RETRIES = 2
NODE_LABEL = "ray.io/node-id"  # a label Ray gives every node: its id


class AvoidsFaultyPlaces:
    """A mixin for a Tune scheduler (see the module): counts the faults trials report of their
    place, lets Ray retry such a trial without spending its retries, and keeps trials off the
    nodes that cannot use the storage. `attach` gives it where to say what it did."""

    def attach(self, log: Callable[[str], None], sweep_dir: Path) -> None:
        """Say what is done about each fault with `log`, and keep the nodes' faults in
        `sweep_dir`/node_faults.json (the sweep's summary names them)."""
        self._log, self._sweep_dir = log, sweep_dir
        # node id -> its storage faults (see read_node_faults). Those of an earlier run of the sweep
        # are kept for its summary; a resume's preflight checked every node, so none is excluded now.
        self._nodes: dict[str, dict] = {node: {**fault, "excluded": False}
                                        for node, fault in read_node_faults(sweep_dir).items()}
        self._ooms: dict[str, int] = {}  # trial key -> times it ran out of GPU memory

    def __getstate__(self) -> dict:
        # Tune pickles its scheduler with the Tuner: what `attach` gave is this driver's, and the
        # counts start over on a resume (see the module).
        return {k: v for k, v in self.__dict__.items() if k not in ("_log", "_sweep_dir", "_nodes", "_ooms")}

    def excluded(self) -> list[str]:
        """The ids of the nodes that get no more trials."""
        return sorted(n for n, fault in getattr(self, "_nodes", {}).items() if fault["excluded"])

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        self._keep_off_excluded(trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._keep_off_excluded(trial)  # a trial to retry is not running now, and not yet queued
        super().on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        if STORAGE_FAULT in result:
            self._storage_fault(trial, result)
        elif OUT_OF_MEMORY in result:
            self._out_of_memory(trial, result)
        return super().on_trial_result(tune_controller, trial, result)

    def _keep_off_excluded(self, trial: Trial) -> None:
        if trial.status != Trial.RUNNING and getattr(self, "_nodes", None) is not None:
            wanted = avoiding(trial.placement_group_factory, self.excluded())
            if wanted != trial.placement_group_factory:
                trial.update_resources(wanted)

    def _storage_fault(self, trial: Trial, result: dict) -> None:
        node = str(result.get("node_id") or "?")
        fault = self._nodes.setdefault(node, {"faults": 0, "excluded": False, "problem": result[STORAGE_FAULT],
                                              "trials": []})
        fault["faults"] += 1
        fault["trials"] = sorted({*fault["trials"], trial_key(trial)})
        problem = result[STORAGE_FAULT].split(": ", 1)[-1]
        allow_another_try(trial)  # its retry, on another node, spends none of its retries
        if not nodes_that_fit(trial.placement_group_factory.required_resources) - set(self.excluded()) - {node}:
            # No other node that fits a trial (a head with no CPUs is none): the storage, not the node, fails.
            write_json(self._sweep_dir / NODE_FAULTS_FILE, self._nodes)
            self._log(f"error: {problem}, and no other node of the cluster can take its trials; the sweep stops "
                      f"here as after Ctrl-C (nothing finished is lost): make the storage reachable, then "
                      f"`cmath-hpo resume` the sweep")
            signal.raise_signal(signal.SIGINT)  # Tune's own Ctrl-C: trials stop where they are, resumable
            return
        where = "the trial is retried on another node"
        if not fault["excluded"] and fault["faults"] >= STORAGE_FAULTS_TO_EXCLUDE:
            fault["excluded"] = True
            where += f"; after {fault['faults']} such faults, the node gets no more trials of this sweep"
        self._log(f"warning: [{trial_key(trial)}] {problem}; {where}")
        write_json(self._sweep_dir / NODE_FAULTS_FILE, self._nodes)

    def _out_of_memory(self, trial: Trial, result: dict) -> None:
        key = trial_key(trial)
        self._ooms[key] = self._ooms.get(key, 0) + 1
        share = f"its {result.get('gpu_share', 0):g} of a GPU"
        if self._ooms[key] <= OOM_RETRIES:
            allow_another_try(trial)
            self._log(f"[{key}] ran out of memory in {share} ({self._ooms[key]}/{OOM_RETRIES + 1}); retried from "
                      f"its last checkpoint after a back-off, not counted against --max-retries")
        else:
            never_retry(trial)
            self._log(f"[{key}] ran out of memory in {share} {self._ooms[key]} times: taken as a config that does "
                      f"not fit in it, so it fails (give trials more of a GPU with --gpus-per-trial, or narrow the "
                      f"space)")


class SweepASHA(AvoidsFaultyPlaces, ASHAScheduler):
    """Ray's ASHA, keeping trials off nodes that cannot use the storage (AvoidsFaultyPlaces).

    A trial a resume carries on (hpo.search.SweepSearch) is a new Ray trial for a lost one, whose
    rungs hpo.tuner.rebuild_rungs recorded under the lost one's id: they become the new trial's,
    so the trial counts once at each rung, not twice."""

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        lost = trial.config.get(CONTINUES)
        if lost and lost != trial.trial_id:
            for bracket in asha_brackets(self):
                for _, recorded in bracket_rungs(bracket):
                    if lost in recorded:
                        recorded[trial.trial_id] = recorded.pop(lost)


class SweepFIFO(AvoidsFaultyPlaces, FIFOScheduler):
    """Ray's first-in first-out scheduler (no early stopping), with AvoidsFaultyPlaces."""


def avoiding(resources: PlacementGroupFactory, nodes: list[str]) -> PlacementGroupFactory:
    """A trial's placement group as it was asked for, kept off `nodes` (ids) if there are any.

    Args:
        resources: the trial's placement group factory (with or without an earlier selector).
        nodes: the ids of the nodes it must not be placed on.

    Returns:
        A factory with the same bundles and strategy, and a label selector per bundle that rules
        out `nodes` (none when `nodes` is empty).
    """
    selector = {"bundle_label_selector": [{NODE_LABEL: f"!in({','.join(nodes)})"} for _ in resources.bundles]}
    return PlacementGroupFactory(resources.bundles, strategy=resources.strategy, **(selector if nodes else {}))
