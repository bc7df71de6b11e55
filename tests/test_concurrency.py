"""How many trials a sweep runs at once by default, and what that leaves TPE (no Ray: the
cluster's resources are given)."""

import math

import pytest
import yaml

from hpo._compat import sampler_uses_constant_liar, searcher_study
from hpo.plan import SweepOptions, cluster_slots, describe_concurrency, plan_sweep, with_slots
from hpo.search import SweepSearch
from hpo.space import make_sampler

SPACE = {"dataset": "iemocap", "seed": 0,
         "search": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                    "gamma1": {"type": "float", "low": 0.0, "high": 3.0}},
         "fixed": {"epochs": 2, "batch_size": 4}, "asha": {"grace_period": 1}}


@pytest.fixture
def plan_for(tmp_path, tiny_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))

    def plan(resources: dict, **options):
        made = plan_sweep(SweepOptions(space=space, data=str(tiny_path), results=tmp_path / "results", name="s",
                                       **options))
        return with_slots(made, cluster_slots(resources, made.options))

    return plan


@pytest.mark.parametrize("samples, resources, per_trial, slots, expected", [
    (8, {"CPU": 2}, {}, 2, 2),                                   # the quick start: the machine's 2 cores
    (8, {"CPU": 64}, {}, 64, 2),                                 # a big cluster, a small budget
    (1000, {"CPU": 300}, {}, 300, 250),
    (64, {"CPU": 64, "GPU": 4}, {"gpus_per_trial": 0.25}, 16, 16),  # 4 trials per GPU
    (3, {"CPU": 16}, {}, 16, 1),
])
def test_default_concurrency_is_the_clusters_slots_up_to_a_quarter_of_the_trials(
        plan_for, samples, resources, per_trial, slots, expected):
    plan = plan_for(resources, num_samples=samples, **per_trial)
    assert (plan.slots, plan.max_concurrent) == (slots, expected)
    text = describe_concurrency(plan)
    assert f"{expected} trials at a time" in text and f"{slots} slots" in text


def test_an_explicit_max_concurrent_is_kept(plan_for):
    plan = plan_for({"CPU": 64}, num_samples=8, max_concurrent=6)
    assert plan.max_concurrent == 6 and "(--max-concurrent)" in describe_concurrency(plan)


@pytest.mark.parametrize("samples, cpus", [(8, 64), (20, 20), (40, 64), (64, 1000), (13, 5)])
def test_tpe_proposes_at_least_half_the_trials_whatever_the_clusters_size(plan_for, samples, cpus):
    """The searcher as Tune drives it: K trials asked at once, then one more each time one ends."""
    plan = plan_for({"CPU": cpus}, num_samples=samples)
    search = SweepSearch(plan.space, plan.n_startup, sampler="tpe")
    running, asked = [], 0
    while asked < samples or running:
        while len(running) < plan.max_concurrent and asked < samples:
            running.append(f"t{asked}")
            config = search.suggest(running[-1])
            assert set(config) == set(SPACE["search"]), config  # the searched values, nothing else
            assert all(spec["low"] <= config[key] <= spec["high"] for key, spec in SPACE["search"].items()), config
            asked += 1
        ended = running.pop(0)
        search.on_trial_complete(ended, {"val_wf1": 0.5, "epoch": 2, "epochs_planned": 2})
    origins = [t.user_attrs["suggested_by"] for t in searcher_study(search).get_trials()]
    assert len(origins) == samples and origins.count("tpe") >= math.ceil(samples / 2), origins


def test_tpe_spreads_trials_asked_together():
    sampler = make_sampler("tpe", seed=0, n_startup_trials=5)
    assert sampler_uses_constant_liar(sampler)  # Optuna's default has changed between releases: set, not assumed
