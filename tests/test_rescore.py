"""Re-scoring's pick, without Ray: the best mean over new seeds, not the sweep's luckiest seed."""

import json

import pandas as pd
import pytest

from cmath_model.config import CMATHConfig
from hpo.errors import SweepError
from hpo.export import close_to_best, export_best
from hpo.record import RESCORE_FILE, RESCORE_TABLE
from hpo.rescore import SEED_OFFSET, append_row, describe, runs_to_train, summarize
from hpo.trials import ranked, records


def _trials(scores: dict[str, float], failed: tuple[str, ...] = ()) -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": t, "number": n, "end_state": "failed" if t in failed else "completed",
                          "best_val_wf1": v, "test_wf1_at_best_val": v, "config": json.dumps({"seed": 0})}
                         for n, (t, v) in enumerate(scores.items())])


def _runs(values: dict[str, list[float | None]]) -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": t, "seed": SEED_OFFSET + k, "best_val_wf1": v, "test_wf1_at_best_val": v,
                          "error": None if v is not None else "FloatingPointError: loss is NaN"}
                         for t, vs in values.items() for k, v in enumerate(vs)])


def test_candidates_are_the_best_trials_that_did_not_fail():
    trials = _trials({"a": 0.50, "b": 0.60, "c": 0.55, "d": 0.70}, failed=("d",))
    assert [r["trial_id"] for r in ranked(trials, 2)] == ["b", "c"]


def test_the_pick_is_the_best_mean_not_the_sweeps_best_seed():
    # b won the sweep on one seed; over two new seeds c is better
    trials = _trials({"a": 0.50, "b": 0.60, "c": 0.58})
    summary = summarize(_runs({"b": [0.52, 0.54], "c": [0.56, 0.57]}), ranked(trials, 2), seeds=2)
    assert summary["picked"] == "c"
    assert [r["trial_id"] for r in summary["trials"]] == ["c", "b"]
    assert summary["trials"][0]["best_val_wf1_mean"] == pytest.approx(0.565)
    assert "c: 56.50 ± 0.71 (sweep 58.00)  <- picked" in describe(summary)


def test_a_trial_that_failed_on_a_seed_is_not_picked():
    trials = _trials({"b": 0.60, "c": 0.58})
    summary = summarize(_runs({"b": [0.70, None], "c": [0.56, 0.57]}), ranked(trials, 2), seeds=2)
    assert summary["picked"] == "c"
    assert "failed on seeds [1001]" in describe(summary)
    with pytest.raises(SweepError, match="no re-scored trial trained on all 2 seeds"):
        summarize(_runs({"b": [0.70, None]}), ranked(trials, 1), seeds=2)


def test_export_best_says_when_other_trials_ended_within_a_point(tmp_path):
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text("{}")
    _trials({"a": 0.553, "b": 0.559, "c": 0.549, "d": 0.50}, failed=("c",)).to_parquet(sweep_dir / "trials.parquet")
    assert close_to_best(sweep_dir, tmp_path) == 1  # a; c failed, d is 5.9 points behind
    assert close_to_best(sweep_dir, tmp_path, within=0.1) == 2


def test_export_takes_the_rescored_pick_with_every_epoch_and_refuses_a_stale_one(tmp_path):
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    record = {"name": "s", "mlflow": {"uri": "sqlite:///x", "experiment": "s"}}
    (sweep_dir / "sweep.json").write_text(json.dumps(record))
    config = json.dumps(CMATHConfig(epochs=12, seed=0).to_dict())
    trials = _trials({"b": 0.60, "c": 0.58}).assign(config=config, best_epoch=[11, 5], mlflow_run_id=None,
                                                    checkpoint=None)
    trials.to_parquet(sweep_dir / "trials.parquet")
    summary = summarize(_runs({"b": [0.52, 0.54], "c": [0.56, 0.57]}), ranked(trials, 2), seeds=2)
    (sweep_dir / RESCORE_FILE).write_text(json.dumps({**summary, "sweep_trials": 2}))
    exported = export_best(sweep_dir, tmp_path / "best.yaml")
    assert exported["provenance"]["trial_id"] == "c" and exported["provenance"]["picked_by"] == "rescore"
    assert exported["epochs"] == 12  # not c's single-seed best epoch (5)
    assert exported["provenance"]["rescore"]["seeds"] == [SEED_OFFSET, SEED_OFFSET + 1]
    pd.concat([trials, _trials({"d": 0.7}).assign(config=config)]).to_parquet(sweep_dir / "trials.parquet")
    with pytest.raises(SweepError, match="saw 2 trials, the sweep has 3 now; re-score again with --top 2 --seeds 2"):
        export_best(sweep_dir, tmp_path / "best.yaml")


def test_a_failed_run_is_trained_again_and_its_row_replaced(tmp_path):
    chosen = ranked(_trials({"b": 0.60, "c": 0.58}), 2)
    for row in records(_runs({"b": [0.52, None], "c": [0.56]})):
        append_row(tmp_path, row)
    todo = runs_to_train(chosen, pd.read_parquet(tmp_path / RESCORE_TABLE), seeds=2)
    assert [(row["trial_id"], seed) for row, seed in todo] == [("b", SEED_OFFSET + 1), ("c", SEED_OFFSET + 1)]
    append_row(tmp_path, {"trial_id": "b", "seed": SEED_OFFSET + 1, "best_val_wf1": 0.53, "error": None})
    table = pd.read_parquet(tmp_path / RESCORE_TABLE)
    assert len(table) == 3 and table["error"].isna().all()
    assert runs_to_train(chosen[:1], table, seeds=2) == []


def test_the_warm_start_is_rescored_beside_the_best_and_can_stay_the_pick():
    """The space's warm start (its defaults) is what a tuned config has to beat on the same new
    seeds; a trial that beat it only on the sweep's seed is not exported over it."""
    from hpo.rescore import candidates

    trials = _trials({"w": 0.55, "b": 0.60, "c": 0.58, "d": 0.57})
    trials["suggested_by"] = ["warm_start", "tpe", "random", "tpe"]
    chosen = candidates(trials, 2)
    assert [r["trial_id"] for r in chosen] == ["b", "c", "w"]
    summary = summarize(_runs({"b": [0.54, 0.55], "c": [0.53, 0.56], "w": [0.56, 0.56]}), chosen, seeds=2)
    assert summary["picked"] == "w" and summary["trials"][0]["warm_start"]
    assert "w: 56.00 (sweep 55.00)  (warm start)  <- picked" in describe(summary)
    assert [r["trial_id"] for r in candidates(trials, 4)] == ["b", "c", "d", "w"]  # among the top: once
    assert [r["trial_id"] for r in candidates(trials.drop(columns="suggested_by"), 2)] == ["b", "c"]
