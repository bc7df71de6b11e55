"""Search-space files: the shipped ones load, every kind of mistake fails naming its key, and the
searcher tells Optuna the truth about pruned, finished and failed trials (no Ray needed)."""

import math
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hpo._compat import searcher_study
from hpo.errors import SpaceError
from hpo.recovery import CHECKPOINTS_OF, CONTINUES
from hpo.search import FINISHED, SweepSearch
from hpo.space import load_space, parse_space
from hpo.study import JOURNAL
from hpo.trials import end_state

REPO = Path(__file__).resolve().parents[1]
GOOD = {
    "dataset": "iemocap",
    "search": {"d": {"type": "int", "low": 100, "high": 600, "step": 50},
               "lr": {"type": "loguniform", "low": 1e-5, "high": 1e-2},
               "modalities": {"type": "categorical", "choices": ["t", "ta", "tav"]}},
    "fixed": {"epochs": 10},
    "warm_start": [{"d": 500, "lr": 3e-3, "modalities": "tav"}],
    "asha": {"grace_period": 2, "reduction_factor": 3},
}


PAPER_SEARCH = {"d", "gamma1", "gamma2", "lr"}


@pytest.mark.parametrize("name, searched", [
    ("iemocap", PAPER_SEARCH), ("quickstart", PAPER_SEARCH),
    # On real transcripts what the recipe fixes by hand is searched beside the paper's four.
    ("meld", PAPER_SEARCH | {"dropout", "input_dropout", "batch_size", "class_weights", "ema_epochs"}),
])
def test_shipped_spaces_load(name, searched):
    space = load_space(REPO / "search_spaces" / f"{name}.yaml")
    assert set(space.distributions) == searched
    assert space.warm_start and space.base_config().epochs >= space.grace_period


def test_good_space_parses_every_type():
    space = parse_space(GOOD, "good.yaml")
    assert isinstance(space.distributions["d"], optuna.distributions.IntDistribution)
    assert space.distributions["d"].step == 50
    assert space.distributions["lr"].log
    assert space.distributions["modalities"].choices == ("t", "ta", "tav")
    assert space.base_config().epochs == 10 and space.base_config().d == 500


def _with(path: str, value):
    """GOOD with one key (dotted path) replaced; value None deletes it."""
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    keys = path.split(".")
    node = raw
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is None:
        del node[keys[-1]]
    else:
        node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value
    return raw


@pytest.mark.parametrize("path, value, message", [
    ("colour", "blue", "colour: unknown key"),
    ("serach", {"lr": {"type": "float", "low": 0.1, "high": 0.2}}, "serach: unknown key (did you mean 'search'?)"),
    ("search.depth", {"type": "int", "low": 1, "high": 3}, "search.depth: is not a CMATHConfig field; the fields"),
    ("search.gama1", {"type": "float", "low": 0, "high": 3},
     "search.gama1: is not a CMATHConfig field (did you mean 'gamma1'?); the fields are in cmath_model/config.py"),
    ("search.d.type", "gaussian", "search.d.type: unknown type 'gaussian'"),
    ("search.d.low", 700, "search.d: low 700 must be below high 600"),
    ("search.d.low", "many", "search.d.low: 'many' must be a finite number"),
    ("search.lr.low", 0.0, "search.lr.low: 0.0 must be > 0 on a log scale"),
    ("search.d.step", -5, "search.d.step: -5 must be a positive number"),
    ("search.d.mean", 3, "search.d.mean: not a key of type int"),
    ("search.lr.type", "int", "search.lr.type: lr is a float field"),
    ("search.modalities.choices", ["t", "x"], "search.modalities.choices"),
    ("search.modalities.choices", [], "search.modalities.choices: expected a non-empty list"),
    ("search.data", {"type": "categorical", "choices": ["a"]}, "search.data: is set by the sweep itself"),
    ("fixed.dropout", 1.5, "fixed: config field 'dropout'"),
    ("fixed.d", 300, "search.d: is also under fixed"),
    ("warm_start.0.d", 900, "warm_start[0].d: 900 lies outside the search range"),
    ("warm_start.0.gamma1", 1.0, "warm_start[0].gamma1: is not a searched field"),
    ("warm_start.0.modalities", "xyz", "warm_start[0].modalities: 'xyz' lies outside the search range"),
    ("warm_start.0.lr", "fast", "warm_start[0].lr: 'fast' lies outside the search range"),
    ("asha.grace_period", 0, "asha.grace_period: 0 must be an integer >= 1"),
    ("asha.grace_period", 50, "asha.grace_period: 50 exceeds the 10 epochs"),
    ("asha.reduction_factor", 1, "asha.reduction_factor: 1.0 must be > 1"),
    ("asha.brackets", 2, "asha.brackets: unknown key"),
    ("asha.grace_peroid", 2, "asha.grace_peroid: unknown key (did you mean 'grace_period'?)"),
    ("metric", "test_wf1", "metric: 'test_wf1' is not supported: sweeps maximise val_wf1"),
    # val_acc would drive TPE and ASHA while best epochs, best/ and export-best use val W-F1.
    ("metric", "val_acc", "metric: 'val_acc' is not supported: sweeps maximise val_wf1"),
    ("dataset", "cmu-mosei", "dataset: 'cmu-mosei' is not one of iemocap, meld"),
    ("search", None, "search: expected a non-empty mapping"),
])
def test_bad_space_names_the_key(path, value, message):
    with pytest.raises(SpaceError) as caught:
        parse_space(_with(path, value), "bad.yaml")
    text = str(caught.value)
    assert text.startswith("bad.yaml: ") and message in text, text
    assert "\n" not in text


def test_a_warm_start_point_names_every_searched_field():
    raw = _with("warm_start.0", {"d": 500, "lr": 3e-3})
    with pytest.raises(SpaceError, match=r"warm_start\[0\]: gives no value for modalities"):
        parse_space(raw, "bad.yaml")


def test_unreadable_space_files(tmp_path):
    with pytest.raises(SpaceError, match="no such search-space file"):
        load_space(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("search: {d: [1, 2\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(broken)
    listed = tmp_path / "list.yaml"
    listed.write_text("- d\n- lr\n")
    with pytest.raises(SpaceError, match="expected a mapping"):
        load_space(listed)


@pytest.mark.parametrize("samples, concurrent, expected", [
    # random start-up plus the trials started while it finishes (concurrent - 1) fill half the budget
    (6, 2, 2), (8, 2, 3), (20, 4, 7), (2, 1, 1),
    (100, 8, 10), (100, 1, 10),  # at most Optuna's default once the budget is large
    (4, 4, 1), (3, 16, 1),  # too many at once to keep half: still one random trial first
])
def test_startup_keeps_half_the_budget_for_tpe(samples, concurrent, expected):
    n = parse_space(GOOD).startup_size(samples, concurrent)
    assert n == expected
    assert parse_space({**GOOD, "startup_trials": 3}).startup_size(samples, concurrent) == 3  # set: kept as it is


def _result(epoch, planned, value, done=True):
    return {"epoch": epoch, "epochs_planned": planned, "val_wf1": value, "training_iteration": epoch, "done": done}


def test_searcher_tells_pruned_completed_and_failed():
    space = parse_space({**GOOD, "warm_start": []})
    search = SweepSearch(space, n_startup_trials=1)
    for trial_id in ("stopped", "finished", "broken"):
        assert set(search.suggest(trial_id)) == set(GOOD["search"])
    search.on_trial_result("stopped", _result(1, 10, 0.30, done=False))
    search.on_trial_complete("stopped", _result(2, 10, 0.25))
    search.on_trial_result("finished", _result(1, 2, 0.40, done=False))
    search.on_trial_complete("finished", _result(2, 2, 0.35))
    search.on_trial_complete("broken", None, error=True)
    trials = {t.user_attrs["ray_trial_id"]: t for t in searcher_study(search).get_trials()}
    assert trials["stopped"].state == TrialState.PRUNED
    assert trials["stopped"].intermediate_values == {1: 0.30, 2: 0.25}
    assert trials["finished"].state == TrialState.COMPLETE
    assert math.isclose(trials["finished"].value, 0.40)  # the best epoch, not the last
    assert trials["broken"].state == TrialState.FAIL
    assert end_state(_result(2, 10, 0.1)) == "stopped_by_asha" and end_state(_result(10, 10, 0.1)) == "completed"
    assert end_state(_result(2, 10, 0.1, done=False)) == "interrupted" and end_state(None) == "failed"


def test_searcher_labels_where_each_trial_came_from():
    search = SweepSearch(parse_space(GOOD), n_startup_trials=1)
    search.suggest("first")
    search.suggest("second")
    search.on_trial_complete("first", _result(10, 10, 0.5))
    search.suggest("third")
    study = searcher_study(search)
    counted, get_trials = [], study.get_trials
    study.get_trials = lambda *args, **kwargs: (counted.append(kwargs.get("states")), get_trials(*args, **kwargs))[1]
    search.suggest("fourth")  # TPE, once it has taken over, for good: the study's trials are not counted again
    assert FINISHED not in counted
    del study.get_trials
    origin = {t.user_attrs["ray_trial_id"]: t.user_attrs["suggested_by"] for t in searcher_study(search).get_trials()}
    assert origin == {"first": "warm_start", "second": "random", "third": "tpe", "fourth": "tpe"}
    assert searcher_study(search).get_trials()[0].params == {"d": 500, "lr": 3e-3, "modalities": "tav"}



@pytest.mark.parametrize("kept_in", ["sqlite", "journal"])
def test_a_restored_searcher_first_hands_out_the_trials_a_killed_driver_lost(tmp_path, kept_in):
    """Ray saves the searcher with its experiment state every 10 s or more, but the study is written
    at once: trials asked for after the last save must come back on a resume, not be asked anew.
    (The journal on a shared storage hands out its own trial objects: a change must not show
    through in what the lost trial is carried on from.)"""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}" if kept_in == "sqlite" else JOURNAL + str(tmp_path / "study")
    space = parse_space({**GOOD, "warm_start": []})
    search = SweepSearch(space, n_startup_trials=1, storage=storage, study_name="s")
    search.suggest("known")
    search.save(str(tmp_path / "searcher.pkl"))  # Ray's last snapshot
    ran = search.suggest("ran")  # started after it
    asked = searcher_study(search).ask(space.distributions).params  # killed before Ray had it
    search.suggest("also-ran")

    restored = SweepSearch(space, n_startup_trials=1, storage=storage, study_name="s")
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("a") == {**ran, CONTINUES: "ran", CHECKPOINTS_OF: "ran"}
    assert restored.suggest("b") == asked  # never ran: handed out as it is, under its new id
    assert restored.suggest("c") == {**searcher_study(search).trials[3].params, CONTINUES: "also-ran",
                                     CHECKPOINTS_OF: "also-ran"}
    assert len(searcher_study(restored).trials) == 4
    restored.suggest("d")  # nothing left over: a new trial
    restored.on_trial_complete("a", _result(10, 10, 0.6))
    trials = searcher_study(restored).trials
    assert len(trials) == 5 and trials[1].state == TrialState.COMPLETE and trials[1].value == 0.6
    assert trials[1].user_attrs == {"ray_trial_id": "ran", "suggested_by": "random", "carried_on_by": "a"}
    assert trials[2].user_attrs["ray_trial_id"] == "b"
