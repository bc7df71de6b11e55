"""The benchmarks' own arithmetic, and one real run through `cmath-hpo bench` (figures come from
full runs, never from tests: nothing here checks a speed against a threshold of time)."""

import json
import os

import pandas as pd
import pytest
import yaml

from benchmarks.footing import first_epoch_at, footing_by_epoch, rank_correlation
from benchmarks.search import compare, curve, epochs_to_reach
from hpo.cli import main as hpo_main


def _trials(rows: list[tuple[float, int, float, str]]) -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": f"t{i}", "finished_at": f, "epochs": e, "best_val_wf1": v,
                          "test_wf1_at_best_val": v - 0.01, "end_state": s} for i, (f, e, v, s) in enumerate(rows)])


def test_epochs_are_counted_in_the_order_trials_finished(tmp_path):
    # finished out of creation order: t1 (10 epochs) ends first, then t0, then t2
    _trials([(2.0, 20, 0.50, "completed"), (1.0, 10, 0.40, "stopped_by_asha"),
             (3.0, 20, 0.70, "completed")]).to_parquet(tmp_path / "trials.parquet")
    trials = curve(tmp_path)
    assert list(trials["epochs_so_far"]) == [10, 30, 50]
    assert list(trials["best_so_far"]) == [0.40, 0.50, 0.70]
    assert epochs_to_reach(trials, 0.45) == 30 and epochs_to_reach(trials, 0.71) is None


def test_tpe_is_measured_against_random_searchs_final_best(tmp_path):
    for name, rows in {"random": [(1, 20, 0.60, "completed"), (2, 20, 0.70, "completed")],
                       "tpe_asha": [(1, 5, 0.50, "stopped_by_asha"), (2, 20, 0.697, "completed"),
                                    (3, 20, 0.80, "completed")]}.items():
        (tmp_path / name).mkdir()
        _trials(rows).to_parquet(tmp_path / name / "trials.parquet")
    rows = {r["method"]: r for r in compare({m: (curve(tmp_path / m), 1.0) for m in ("tpe_asha", "random")},
                                            "small", 0)}
    assert rows["random"]["epochs_total"] == 40 and rows["tpe_asha"]["epochs_total"] == 45
    # 0.697 is within 0.5 points of random's best 0.70: reached after 5 + 20 epochs
    assert rows["tpe_asha"]["epochs_to_within"] == 25
    assert rows["tpe_asha"]["fraction_of_random_total"] == pytest.approx(25 / 40)


def _history(curves: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": t, "epoch": e + 1, "val_wf1": v} for t, values in curves.items()
                         for e, v in enumerate(values)])


def test_rank_correlation_compares_the_grace_epoch_with_each_trials_best():
    # At epoch 2 the order is a < b < c; their bests (epoch 3 or 4) keep it: rho 1.
    kept = _history({"a": [0.1, 0.2, 0.3, 0.35], "b": [0.1, 0.3, 0.4, 0.2], "c": [0.2, 0.4, 0.5, 0.6]})
    assert rank_correlation(kept, grace_period=2)[0] == pytest.approx(1.0)
    # The early leader ends last and the early last ends first: rho -1.
    flipped = _history({"a": [0.1, 0.1, 0.9], "b": [0.1, 0.5, 0.7], "c": [0.1, 0.6, 0.3]})
    rho, _, n = rank_correlation(flipped, grace_period=2)
    assert n == 3 and rho == pytest.approx(-1.0)
    # A trial that never reached the grace period is left out, not counted as a zero.
    short = _history({"a": [0.1, 0.2], "b": [0.1, 0.3], "c": [0.4], "d": [0.1, 0.4]})
    assert rank_correlation(short, grace_period=2)[2] == 3


def test_footing_settles_at_the_first_epoch_from_which_rho_stays_at_the_goal():
    # The bests rank a < b < c: epoch 1 has them reversed, epoch 2 half wrong, epochs 3 and 4
    # right. Only epochs every trial reached are compared.
    history = _history({"a": [0.3, 0.2, 0.1, 0.35], "b": [0.2, 0.1, 0.3, 0.4], "c": [0.1, 0.15, 0.5, 0.6]})
    by_epoch = footing_by_epoch(history)
    assert by_epoch == pytest.approx({1: -1.0, 2: -0.5, 3: 1.0, 4: 1.0})
    assert list(footing_by_epoch(history[(history["epoch"] <= 3) | (history["trial_id"] != "c")])) == [1, 2, 3]
    assert first_epoch_at(by_epoch, 0.7) == 3
    # A dip after the first good epoch moves the settling point past it.
    assert first_epoch_at({1: 0.9, 2: 0.5, 3: 0.8}, 0.7) == 3
    assert first_epoch_at({1: 0.9, 2: 0.5}, 0.7) is None


@pytest.mark.slow
def test_bench_verb_runs_the_speed_benchmark(tmp_path, capfd):
    assert hpo_main(["bench", "speed", "--quick", "--out", str(tmp_path), "--data-dir", str(tmp_path / "data")]) == 0
    result = json.loads((tmp_path / "speed-quick.json").read_text())
    batched, loop = result["rows"]
    assert (batched["implementation"], loop["implementation"]) == ("batched", "per_dialogue")
    assert batched["ms_per_epoch"] > 0 and loop["ms_per_epoch"] > 0 and batched["peak_mem_mb"] > 0
    assert batched["max_logit_diff"] < 1e-4  # padding and batching change no logit
    assert (result["benchmark"], result["quick"]) == ("speed", True)
    assert result["machine"]["cpus"] == len(os.sched_getaffinity(0))  # what it ran on, and how:
    assert result["command"].split()[1:] == ["speed", "--quick", "--out", str(tmp_path), "--data-dir",
                                             str(tmp_path / "data")]  # the words after the program's name
    assert "ms_per_epoch" in capfd.readouterr().out
    assert (tmp_path / "data" / "synthetic-iemocap-tiny.parquet").exists()


def test_the_epoch_profile_tiles_a_training_epoch_by_part(tiny_path):
    """benchmarks.epoch --profile: the parts it marks (hooks and wrappers from outside the code)
    are found in a real epoch, and with the rest they add up to the epoch's wall time."""
    from benchmarks.epoch import measure_profile, part_rows

    profile = measure_profile(dict(dataset="iemocap", data=str(tiny_path), modalities="tav", threads=1,
                                   set={"d": 32}))
    parts = {row["part"]: row["ms"] for row in part_rows(profile)}
    for part in ("forward", "backward", "optimiser (Adam)", "losses (Eq. 18-24)",
                 "  CMA cross-modal streams (Eq. 9-10)", "  CMA central streams (Eq. 11)"):
        assert parts[part] > 0, part
    top_level = [ms for name, ms in parts.items() if not name.startswith("  ")]
    assert sum(top_level) == pytest.approx(profile["wall_ms"], rel=1e-6)
    assert parts["  CMA central streams (Eq. 11)"] < parts["forward"]  # inside it
    assert profile["ops"][0]["self_ms"] >= profile["ops"][-1]["self_ms"]


def test_the_wf1_comparison_says_how_far_apart_two_trees_score():
    from benchmarks.epoch import compare_wf1

    old = [{"seed": s, "val_wf1": v, "test_wf1": t} for s, v, t in ((0, 0.55, 0.59), (1, 0.56, 0.60), (2, 0.54, 0.58))]
    new = [{"seed": s, "val_wf1": v - 0.01, "test_wf1": t - 0.01} for s, v, t in
           ((0, 0.55, 0.59), (1, 0.56, 0.60), (2, 0.54, 0.58))]
    result = compare_wf1({"old": old, "new": new})
    assert result["test_diff"] == pytest.approx(-1.0) and result["val_diff"] == pytest.approx(-1.0)
    assert 0.0 < result["test_p"] < 1.0
    assert [row["code"] for row in result["rows"]] == ["old", "new"]


def test_the_gpu_benchmark_runs_its_switches_on_the_cpu_when_there_is_no_gpu(tmp_path):
    """`benchmarks gpu --quick` runs every code path it would run on a GPU (here on the CPU)."""
    from benchmarks.gpu import main as gpu_main

    gpu_main(["--quick", "--sweep", "--out", str(tmp_path), "--data-dir", str(tmp_path / "data")])
    result = json.loads((tmp_path / "gpu-quick.json").read_text())
    switches = {(row["workload"], row["switch"]) for row in result["rows"]}
    assert {switch for _, switch in switches} == {"defaults", "precision bf16"} and len(switches) == 4
    assert all(row["s_per_epoch"] > 0 for row in result["rows"])
    [sweep] = result["sweep"]  # on the CPU: no GPU share, no MPS, no utilisation samples
    assert (sweep["trials"], sweep["completed"] + sweep["stopped"], sweep["mps"]) == (4, 4, False)
    assert sweep["trials_per_hour"] > 0 and (tmp_path / "gpu-sweep-quick" / "gpu64" / "trials.parquet").exists()


def test_the_recipe_protocol_keeps_a_departure_only_on_a_significant_validation_gain():
    from benchmarks.recipe import fewest_epochs, keeps

    base = [55.0, 56.0, 54.5, 55.5, 56.5]
    assert keeps([b + 0.8 + 0.05 * i for i, b in enumerate(base)], base)  # higher on every seed
    assert not keeps([b + d for b, d in zip(base, (1.5, -1.2, 1.4, -1.0, 0.9))], base)  # higher mean, noise
    assert not keeps([b - 0.8 for b in base], base)  # significantly lower
    assert not keeps(base, base)
    # The fewest epochs that are not significantly worse than the best count.
    assert fewest_epochs({12: [b - 0.1 * (i % 2) for i, b in enumerate(base)], 30: base}) == 12
    assert fewest_epochs({12: [b - 1.0 - 0.02 * i for i, b in enumerate(base)], 15: base, 30: base}) == 15


def test_the_recipe_protocol_judges_every_departure_of_the_recipe():
    from benchmarks.recipe import departures
    from cmath_model.config import RECIPE, paper_defaults

    for dataset in ("iemocap", "meld"):
        found = departures(dataset)
        assert set(found) == set(RECIPE[dataset]) - {"epochs"}
        assert all(paper == getattr(paper_defaults(dataset), key) for key, (_, paper) in found.items())


def test_a_shorter_run_is_the_start_of_a_longer_one(tmp_path):
    """benchmarks.recipe reads every epoch count off one long run: with MELD's recipe (weight
    average, input dropout, class weights), a 2-epoch run is the first 2 epochs of a 3-epoch one."""
    from cmath_model.config import recipe_defaults
    from cmath_model.data import load_dataset
    from cmath_model.synth import write_synthetic
    from cmath_model.train import train

    data = load_dataset(write_synthetic(tmp_path / "meld-tiny.parquet", "meld", "tiny"))
    config = recipe_defaults("meld").replace(d=16, modalities="t", num_threads=1, ema_epochs=1.0)
    short, long = (train(config.replace(epochs=e), data)["epochs"] for e in (2, 3))
    assert [r["val_wf1"] for r in short] == [r["val_wf1"] for r in long[:2]]
    assert [r["train_loss"] for r in short] == [r["train_loss"] for r in long[:2]]
    assert long[2]["train_loss"] != long[1]["train_loss"]


def test_the_recipe_protocol_runs_end_to_end_on_validation_only(tmp_path):
    from benchmarks.recipe import main as recipe_main

    recipe_main(["--phase", "decide", "--quick", "--out", str(tmp_path), "--data-dir", str(tmp_path / "data")])
    result = json.loads((tmp_path / "recipe-decide-quick.json").read_text())
    decided = [row["decision"].split(":")[0] for row in result["rows"]]
    assert decided[:2] == ["epochs 2", "epochs 3"] and "class_weights" in decided and "ema_epochs" in decided
    assert result["decision"]["epochs"] in (2, 3) and result["seeds"] == [0, 1]
    cached = list((tmp_path / "work").rglob("*.json"))
    assert cached and not any("test_wf1" in json.loads(path.read_text()) for path in cached)  # test never read


def test_the_recipe_search_phase_sets_a_rescored_pick_beside_the_defaults(tmp_path):
    """A small sweep, its re-scoring with the warm start beside the best, the export, and both
    configs on the test seeds: what `--phase search` reports is what those steps produced."""
    from benchmarks.recipe import main as recipe_main

    recipe_main(["--phase", "search", "--quick", "--out", str(tmp_path), "--data-dir", str(tmp_path / "data")])
    result = json.loads((tmp_path / "recipe-search-quick.json").read_text())
    defaults, pick = result["rows"]
    assert defaults["model"] == "CMATH text-only, defaults: recipe" and result["seeds"] == [2, 3]
    assert len(pick["test_values"]) == 2 and 0.0 <= pick["test_p_vs_recipe"] <= 1.0
    sweep_dir = tmp_path / "work" / "search-synthetic-meld-tiny-3"
    rescored = json.loads((sweep_dir / "rescored.json").read_text())
    assert pick["rescore"]["picked"] == rescored["picked"]
    assert any(t["warm_start"] for t in rescored["trials"])  # the defaults it had to beat, re-scored too
    exported = yaml.safe_load((tmp_path / "work" / "search-synthetic-meld-tiny-3-best.yaml").read_text())
    assert exported["provenance"]["trial_id"] == rescored["picked"] and pick["config"]["d"] == exported["d"]


def test_the_epoch_benchmark_times_the_same_meld_config_in_both_trees(tmp_path):
    """Issue 31 changed MELD's recipe (a modelling decision); the epoch benchmark keeps timing the
    recipe c36e0c1 had, so a lighter config is not counted as a faster epoch."""
    import argparse

    from benchmarks.epoch import C36E0C1_MELD, _trainer, workloads
    from cmath_model.config import recipe_defaults

    assert any(getattr(recipe_defaults("meld"), k) != v for k, v in C36E0C1_MELD.items())  # else nothing to pin
    [meld] = [w for w in workloads(argparse.Namespace(quick=True, data_dir=tmp_path)) if w["dataset"] == "meld"]
    config = _trainer({**meld, "threads": 1}).config
    assert all(getattr(config, k) == v for k, v in C36E0C1_MELD.items())
