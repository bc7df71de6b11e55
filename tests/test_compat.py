"""Each private Ray Tune / Optuna name in hpo/_compat.py, exercised against the installed
libraries: an upgrade that moves, renames or changes one fails here."""

import optuna
import optuna.distributions as od
import pytest
from optuna.trial import TrialState
from ray import tune

from hpo import _compat
from hpo.search import SweepSearch
from hpo.space import parse_space

SPACE = {"name": "compat", "dataset": "iemocap", "seed": 0,
         "search": {"d": {"type": "int", "low": 32, "high": 96, "step": 16}},
         "warm_start": [{"d": 64}]}


def test_training_result_is_what_tune_hands_a_trainables_restore(tmp_path):
    """As CMATHTrial.restore hands one over: Tune loads its checkpoint and takes its epoch count."""
    from pathlib import Path

    from ray import tune
    from ray.tune.trainable import Trainable

    class Loads(Trainable):
        def step(self):
            return {"score": 1.0}

        def load_checkpoint(self, checkpoint_dir):
            self.loaded = (Path(checkpoint_dir) / "state.txt").read_text()

    (tmp_path / "state.txt").write_text("epoch 3")
    trainable = Loads(config={})
    try:
        trainable.restore(_compat.TrainingResult(checkpoint=tune.Checkpoint.from_directory(str(tmp_path)),
                                                 metrics={"training_iteration": 3}))
        assert (trainable.loaded, trainable.training_iteration) == ("epoch 3", 3)
    finally:
        trainable.stop()
    with pytest.raises(AttributeError):
        _compat.NoSuchName  # noqa: B018


def test_optuna_search_keeps_its_study_trials_and_told_set_where_we_read_them():
    search = SweepSearch(parse_space(SPACE), n_startup_trials=1)
    assert search.suggest("first") == {"d": 64}
    study, trials = _compat.searcher_study(search), _compat.searcher_trials(search)
    assert isinstance(study, optuna.Study) and isinstance(trials["first"], optuna.Trial)
    assert trials["first"].number == 0 and "first" not in _compat.searcher_told(search)
    search.on_trial_complete("first", {"val_wf1": 0.5, "epoch": 3, "epochs_planned": 3})
    assert "first" in _compat.searcher_told(search)
    assert study.get_trials()[0].state == TrialState.COMPLETE


def test_a_tune_trial_told_never_to_retry_does_not_recover():
    from ray.tune.experiment import Trial

    trial = Trial("compat_trainable", config={}, stub=True, max_failures=3)
    trial.run_metadata.num_failures = 1
    assert trial.should_recover()
    _compat.never_retry(trial)
    assert not trial.should_recover()


def test_a_trial_can_be_given_one_more_try():
    from ray.tune.experiment import Trial

    trial = Trial("compat_trainable", config={}, stub=True, max_failures=1)
    trial.run_metadata.num_failures = 2
    assert not trial.should_recover()
    _compat.allow_another_try(trial)
    assert trial.should_recover()


def test_a_trainables_iteration_count_restarts_at_zero():
    from ray.tune.trainable import Trainable

    class Counts(Trainable):
        def step(self):
            return {"score": 1.0}

    trainable = Counts(config={})
    try:
        trainable.train()
        trainable.train()
        assert trainable.training_iteration == 2
        _compat.restart_iteration_count(trainable)
        assert trainable.training_iteration == 0
        assert trainable.train()["training_iteration"] == 1
    finally:
        trainable.stop()


def test_optuna_storage_reads_and_writes_one_trial():
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"x": 1.0})
    queued = study.ask({"x": od.FloatDistribution(0.0, 2.0)})
    asked = study.ask({"x": od.FloatDistribution(0.0, 2.0)})
    assert _compat.is_enqueued(study, queued) and not _compat.is_enqueued(study, asked)
    queued.report(0.25, 1)
    stored = _compat.stored_trial(study, queued)
    assert stored.number == queued.number and stored.intermediate_values == {1: 0.25}
    assert stored.state == TrialState.RUNNING
    frozen = study.get_trials()[1]
    assert _compat.storage_id(frozen) == _compat.storage_id(asked) != _compat.storage_id(queued)
    again = _compat.study_trial(study, frozen)  # a handle on a trial asked before (by a killed driver)
    again.set_user_attr("note", "carried on")
    study.tell(again, 0.5)
    assert study.get_trials()[1].user_attrs == {"note": "carried on"} and study.get_trials()[1].value == 0.5


def test_an_asha_bracket_and_its_rungs_are_rays():
    """tests/test_checkpoints.py checks hpo.plan.asha_rungs against these."""
    from ray.tune.experiment import Trial

    bracket = _compat.asha_bracket(2, 20, 2)
    assert [milestone for milestone, _ in _compat.bracket_rungs(bracket)] == [16, 8, 4, 2]
    bracket.on_result(Trial("CMATHTrial", config={}, trial_id="t", stub=True), 2, 0.5)
    assert dict(_compat.bracket_rungs(bracket))[2] == {"t": 0.5}


def test_constant_liar_is_read_from_a_tpe_sampler():
    assert _compat.sampler_uses_constant_liar(optuna.samplers.TPESampler(constant_liar=True))
    assert not _compat.sampler_uses_constant_liar(optuna.samplers.TPESampler(constant_liar=False))
    assert not _compat.sampler_uses_constant_liar(optuna.samplers.RandomSampler())


@pytest.mark.parametrize("distribution, inside, outside", [
    (od.IntDistribution(32, 96, step=16), [32, 48, 96], [40, 112, 16]),
    (od.FloatDistribution(1e-4, 1e-2, log=True), [1e-4, 3e-3], [1e-5, 0.1]),
    (od.FloatDistribution(0.0, 1.0, step=0.25), [0.0, 0.75], [0.3, 1.25]),
    (od.CategoricalDistribution(["t", "tav"]), ["t", "tav"], ["av"]),
])
def test_distribution_contains_follows_optunas_bounds_steps_and_choices(distribution, inside, outside):
    assert all(_compat.distribution_contains(distribution, v) for v in inside)
    assert not any(_compat.distribution_contains(distribution, v) for v in outside)


class _Where(tune.Callback):
    def __init__(self, host: str):
        self.host = host


def _nothing(config):
    return None


def test_a_restored_tuner_runs_the_callbacks_it_is_given(tmp_path):
    """Tuner.restore brings back the first driver's pickled callbacks, where set_restored_callbacks
    replaces them (Ray's fit reads the callbacks from that RunConfig), and its scheduler, whose
    rungs hpo.tuner.rebuild_rungs fills (tests/test_resume.py)."""
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(time_attr="training_iteration", metric="val_wf1", mode="max", max_t=8, grace_period=2)
    tune.Tuner(_nothing, tune_config=tune.TuneConfig(scheduler=scheduler),
               run_config=tune.RunConfig(name="x", storage_path=str(tmp_path), callbacks=[_Where("first host")]))
    restored = tune.Tuner.restore(str(tmp_path / "x"), trainable=_nothing)
    asha = _compat.restored_scheduler(restored)
    assert isinstance(asha, ASHAScheduler) and len(_compat.asha_brackets(asha)) == 1
    run_config = restored._local_tuner._run_config
    assert [c.host for c in run_config.callbacks] == ["first host"]
    _compat.set_restored_callbacks(restored, [_Where("this host")])
    assert [c.host for c in restored._local_tuner._run_config.callbacks] == ["this host"]


def test_snapshots_wait_in_proportion_to_their_size_and_checkpoints_force_none(tmp_path):
    """Tune's snapshot manager: its period after a save, and whether a trial's checkpoints force
    the next snapshot, before and after bound_snapshot_rate."""
    from types import SimpleNamespace

    (tmp_path / "experiment_state-x.json").write_bytes(b"0" * 2_000_000)
    (tmp_path / "searcher-state-x.pkl").write_bytes(b"0" * 1_000_000)
    (tmp_path / "CMATHTrial_a").mkdir()

    def manager():
        return _compat.snapshot_manager()(storage=SimpleNamespace(experiment_driver_staging_path=str(tmp_path)),
                                          checkpoint_period="auto", sync_every_n_trial_checkpoints=2)

    def after_save(m, seconds):
        m._update_auto_checkpoint_time(seconds)
        return m._checkpoint_period

    def forced(m):
        m.on_trial_checkpoint("a trial"), m.on_trial_checkpoint("a trial")
        return m._should_force_sync_up

    if not hasattr(_compat.snapshot_manager(), "_cmath_update_period"):  # Ray's own, unless a sweep ran here
        assert after_save(manager(), 0.01) == 10.0 and forced(manager())
    _compat.bound_snapshot_rate(100_000)
    assert after_save(manager(), 0.01) == pytest.approx(30.0)  # 3 MB at 100 kB/s
    assert after_save(manager(), 2.0) == pytest.approx(38.0)  # Tune's own, 19 times the save, when longer
    assert not forced(manager())  # a restored trial finds its newest checkpoint itself (tests/test_resume.py)
    _compat.bound_snapshot_rate(1_000_000)
    assert after_save(manager(), 0.01) == 10.0


def test_an_ended_trial_can_keep_the_statistics_of_one_metric():
    from ray.tune.experiment import Trial

    trial = Trial("x", config={}, trial_id="t", stub=True)
    trial.update_last_result({"val_wf1": 0.5, "epoch": 1, "training_iteration": 1})
    trial.update_last_result({"val_wf1": 0.7, "epoch": 2, "training_iteration": 2})
    assert {"val_wf1", "epoch", "training_iteration"} <= set(trial.run_metadata.metric_analysis)
    _compat.keep_statistics_of(trial, "val_wf1")
    assert set(trial.run_metadata.metric_analysis) == set(trial.run_metadata.metric_n_steps) == {"val_wf1"}
    assert trial.run_metadata.metric_analysis["val_wf1"]["max"] == 0.7
    assert '"epoch"' not in trial.run_metadata.get_json_state().split('"metric_analysis"')[1]


@pytest.mark.slow
def test_a_trainable_finds_its_trial_folder_and_numbers_its_checkpoints_after_one(tmp_path, shared_ray):
    """In a real Tune run: trial_folder is where Tune puts the trial's checkpoints, and after
    number_checkpoints_after(4) the next one is checkpoint_000005."""
    from pathlib import Path

    import pyarrow.fs as pafs
    from ray.tune import Trainable

    class Numbers(Trainable):
        def step(self):
            fs, folder = _compat.trial_folder(self)
            _compat.number_checkpoints_after(self, 4)
            return {"folder": folder, "local": isinstance(fs, pafs.LocalFileSystem), "done": True}

        def save_checkpoint(self, checkpoint_dir):
            (Path(checkpoint_dir) / "state.txt").write_text("saved")

    tuner = tune.Tuner(Numbers, run_config=tune.RunConfig(
        storage_path=str(tmp_path), name="numbers", checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=True)))
    [result] = tuner.fit()
    assert result.error is None and result.metrics["local"]
    assert result.checkpoint.path.rstrip("/") == f"{result.metrics['folder']}/checkpoint_000005"
    assert (Path(result.checkpoint.path) / "state.txt").read_text() == "saved"
