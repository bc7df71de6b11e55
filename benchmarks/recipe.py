"""Issue 31's protocol: each departure of a dataset's recipe judged on validation W-F1 over seeds
not used before, then test W-F1 read once, on other fresh seeds, for what the code ships.

`--phase decide` (seeds 10-14 by default): the recipe trained for the longest epoch count in
EPOCH_CHOICES, and the recipe with each departure (a RECIPE key; epochs apart) set back to the
paper's reading, trained for ABLATION_EPOCHS. The recipe's learning rate is constant, so the
first E epochs of a longer run are an E-epoch run, and one long run answers every epoch count.
A run's score is the validation W-F1 of its best epoch within E. The rule, fixed before any run:
a departure stays only if it raises mean validation W-F1 with a paired t-test p < 0.05 over the
seeds; otherwise the paper's reading (the simpler model) is kept. Epochs: the fewest of
EPOCH_CHOICES whose validation is not below the best count's with p < 0.05 (cheaper at equal
score). No test score is read in this phase.

`--phase test` (seeds 20-24): the recipe and the paper's reading as the code now ships them,
and the logistic regression on the same embeddings, each scored on test once.

`--phase search` (seeds 20-24): does a sweep earn its keep? A sweep of at most 32 trials over
search_spaces/meld.yaml (Optuna TPE, ASHA), its best 3 trials re-scored on 3 new seeds each
(validation only, as `cmath-hpo export-best --top 3 --seeds 3` does), the pick exported, then
trained on the test seeds beside the recipe's defaults; test W-F1 of both, paired t-test.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from .common import meld_text_dataset, parser, save, synthetic_dataset

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "meld.yaml"
QUICK_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "bench" / "recipe-quick.yaml"
EPOCH_CHOICES = (12, 15, 20, 30)
ABLATION_EPOCHS = 15
P_TO_KEEP = 0.05
COLUMNS = ["decision", "with", "without", "diff", "p", "kept"]
TEST_COLUMNS = ["model", "seeds", "val_wf1", "val_std", "test_wf1", "test_std", "test_p_vs_recipe"]


def _seed_list(text: str) -> list[int]:
    """'10-14' or '10,11,12' -> [10, 11, 12, ...]."""
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


def departures(dataset: str) -> dict[str, tuple[object, object]]:
    """The recipe's departures from the paper for `dataset` (iemocap | meld).

    Returns:
        field -> (the recipe's value, the paper's reading), for each RECIPE key but epochs whose
        value differs from the paper's reading (the dataclass default or PAPER)."""
    from cmath_model.config import RECIPE, paper_defaults

    paper = paper_defaults(dataset)
    return {key: (value, getattr(paper, key)) for key, value in RECIPE[dataset].items()
            if key != "epochs" and getattr(paper, key) != value}


def _best_within(curve: list[float], epochs: int) -> float:
    """Validation W-F1 of the best epoch among the first `epochs` (what an `epochs`-epoch run selects)."""
    return max(curve[:epochs])


def _paired_p(a: list[float], b: list[float]) -> float:
    """Two-sided paired t-test over seeds; 1.0 when the pairs do not differ at all."""
    from scipy import stats

    if all(x == y for x, y in zip(a, b)):
        return 1.0
    return float(stats.ttest_rel(a, b).pvalue)


def keeps(with_: list[float], without: list[float], threshold: float = P_TO_KEEP) -> bool:
    """The protocol's rule: a departure stays only if validation is higher with it, significantly.

    Args:
        with_, without: validation W-F1 per seed, the same seeds in the same order.
        threshold: the paired t-test's p below which the difference counts.

    Returns:
        True when the mean with it is higher and the two-sided paired p is below `threshold`."""
    return statistics.mean(with_) > statistics.mean(without) and _paired_p(with_, without) < threshold


def fewest_epochs(scores: dict[int, list[float]], threshold: float = P_TO_KEEP) -> int:
    """The epoch count to train, cheapest first among those that score as well as the best.

    Args:
        scores: epoch count -> validation W-F1 per seed (the same seeds in the same order).
        threshold: the paired t-test's p below which a count is worse than the best one.

    Returns:
        The fewest epochs whose validation W-F1 is not significantly below the best count's."""
    best = max(scores, key=lambda e: statistics.mean(scores[e]))
    for epochs in sorted(scores):
        if epochs == best or not (statistics.mean(scores[epochs]) < statistics.mean(scores[best])
                                  and _paired_p(scores[epochs], scores[best]) < threshold):
            return epochs
    return best


def _train_point(job: dict) -> dict:
    """One training run in a worker process: its per-epoch validation (and, if asked, test) W-F1."""
    import torch

    from cmath_model.config import from_dict
    from cmath_model.data import load_dataset
    from cmath_model.train import train

    torch.set_num_threads(1)
    config = from_dict(job["config"])
    started = time.perf_counter()
    result = train(config, load_dataset(config.data))
    curve = {"val_wf1": [r["val_wf1"] for r in result["epochs"]], "seconds": time.perf_counter() - started}
    if job["read_test"]:
        curve["test_wf1"] = [r["test_wf1"] for r in result["epochs"]]
    return curve


def _run_all(jobs: dict[str, dict], cache: Path, workers: int) -> dict[str, dict]:
    """Each job once, `workers` at a time; a finished run's result is kept in `cache` under its
    config's hash, so a run that was stopped carries on where it was and a changed config reruns."""
    cache.mkdir(parents=True, exist_ok=True)
    files = {key: cache / f"{key}-{_digest(job)}.json" for key, job in jobs.items()}
    done = {key: json.loads(files[key].read_text()) for key in jobs if files[key].exists()}
    todo = {key: job for key, job in jobs.items() if key not in done}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {key: pool.submit(_train_point, job) for key, job in todo.items()}
        for key, future in futures.items():
            done[key] = future.result()
            files[key].write_text(json.dumps(done[key]))
            print(f"recipe: {key}: best validation W-F1 {100 * max(done[key]['val_wf1']):.2f} "
                  f"({done[key]['seconds']:.0f} s)", flush=True)
    return done


def _digest(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:12]


def _decide(data_path: Path, dataset: str, seeds: list[int], epoch_choices: tuple[int, ...], ablation_epochs: int,
           cache: Path, workers: int) -> tuple[list[dict], dict]:
    """The decide phase's runs and its table (validation only)."""
    from cmath_model.config import recipe_defaults

    recipe = _text_only(recipe_defaults(dataset), data_path)
    if recipe.lr_schedule != "constant" or recipe.warmup_epochs:
        raise SystemExit("benchmarks.recipe reads shorter runs off a longer one; that needs a constant learning rate")
    changes = departures(dataset)
    jobs = {}
    for seed in seeds:
        jobs[f"recipe-seed{seed}"] = dict(config=recipe.replace(seed=seed, epochs=max(epoch_choices)).to_dict(),
                                          read_test=False)
        for field, (_, paper_value) in changes.items():
            config = recipe.replace(seed=seed, epochs=ablation_epochs, **{field: paper_value})
            jobs[f"without-{field}-seed{seed}"] = dict(config=config.to_dict(), read_test=False)
    runs = _run_all(jobs, cache, workers)

    def scores(prefix: str, epochs: int) -> list[float]:
        return [100 * _best_within(runs[f"{prefix}-seed{seed}"]["val_wf1"], epochs) for seed in seeds]

    per_epochs = {e: scores("recipe", e) for e in epoch_choices}
    chosen = fewest_epochs(per_epochs)
    rows = []
    best = max(per_epochs, key=lambda e: statistics.mean(per_epochs[e]))
    for epochs, values in per_epochs.items():
        rows.append(dict(decision=f"epochs {epochs}", with_=values, without=per_epochs[best],
                         p=_paired_p(values, per_epochs[best]), kept=epochs == chosen))
    judged_at = min(chosen, ablation_epochs)
    for field, (recipe_value, paper_value) in changes.items():
        with_, without = scores("recipe", judged_at), scores(f"without-{field}", judged_at)
        rows.append(dict(decision=f"{field}: {recipe_value} (paper: {paper_value})", with_=with_, without=without,
                         p=_paired_p(with_, without), kept=keeps(with_, without)))
    kept = {field: row["kept"] for field, row in zip(changes, rows[len(per_epochs):])}
    dropped = {field: changes[field][1] for field, keep in kept.items() if not keep}
    if dropped:
        # Each departure was judged with the others on; dropped together their small gains may add
        # up. If the whole recipe is significantly better than the decided one, the whole one stays.
        decided = recipe.replace(epochs=chosen, **dropped)
        decided_jobs = {f"decided-seed{seed}": dict(config=decided.replace(seed=seed).to_dict(), read_test=False)
                        for seed in seeds}
        runs.update(_run_all(decided_jobs, cache, workers))
        with_, without = scores("recipe", chosen), scores("decided", chosen)
        whole = keeps(with_, without)
        rows.append(dict(decision=f"the whole recipe against the decided one (without {', '.join(dropped)})",
                         with_=with_, without=without, p=_paired_p(with_, without), kept=whole))
        if whole:
            kept = dict.fromkeys(kept, True)
    table = [dict(decision=r["decision"], with_values=r["with_"], without_values=r["without"],
                  **{"with": _mean_std(r["with_"]), "without": _mean_std(r["without"])},
                  diff=statistics.mean(r["with_"]) - statistics.mean(r["without"]), p=r["p"], kept=r["kept"])
             for r in rows]
    decision = {"epochs": chosen, "judged_at_epochs": judged_at, "kept": kept}
    return table, decision


def _test_phase(data_path: Path, dataset: str, seeds: list[int], cache: Path, workers: int) -> list[dict]:
    """The shipped recipe and the paper's reading on fresh seeds, and the logistic regression: test read once."""
    from scipy import stats

    from cmath_model.baselines import logistic_regression
    from cmath_model.config import default_config
    from cmath_model.data import load_dataset

    paper = default_config(dataset, "paper")
    # The paper's squared norms are sums; the same reading with means shows what that choice alone does.
    variants = {"recipe": default_config(dataset, "recipe"), "paper": paper,
                "paper, norm_reduction mean": paper.replace(norm_reduction="mean")}
    rows, tests = _scored_on_test({name: (f"CMATH text-only, defaults: {name}", _text_only(config, data_path))
                                   for name, config in variants.items()}, seeds, cache, workers)
    fit = logistic_regression(load_dataset(data_path), ("text",))
    logreg = 100 * fit["test_wf1_at_best_val"]
    rows.append(dict(model=f"logistic regression per utterance (C={fit['C']:g})", seeds="-",
                     val_wf1=100 * fit["best_val_wf1"], test_wf1=logreg,
                     test_p_vs_recipe=float(stats.ttest_1samp(tests["recipe"], logreg).pvalue)))
    return rows


def _search_phase(data_path: Path, dataset: str, seeds: list[int], trials: int, top: int, rescore_seeds: int,
                 space: Path, work: Path, cache: Path, workers: int) -> list[dict]:
    """A sweep, its re-scored pick and the recipe's defaults, the last two on the test seeds."""
    from cmath_model.config import default_config, from_dict
    from hpo.export import export_best
    from hpo.rescore import rescore_best
    from hpo.sweep import SweepOptions, run_sweep

    name = f"search-{data_path.stem}-{trials}"
    sweep_dir = work / name
    record = sweep_dir / "sweep.json"
    if not (record.exists() and json.loads(record.read_text()).get("status") == "finished"):
        options = SweepOptions(space=space, data=str(data_path), num_samples=trials, max_concurrent=workers,
                               cpus_per_trial=1, num_cpus=workers, results=work, name=name,
                               overrides={"modalities": "t"}, command="benchmarks.recipe --phase search")
        outcome = run_sweep(options, log=lambda line: None)
        print(f"recipe: sweep {name}: {outcome.counts} in {outcome.fit_seconds:.0f} s", flush=True)
    rescored = rescore_best(sweep_dir, top=top, seeds=rescore_seeds, results=work, num_cpus=workers,
                            log=lambda line: None)
    values = export_best(sweep_dir, work / f"{name}-best.yaml", results=work)
    provenance = values.pop("provenance")
    picked = from_dict(values).replace(num_threads=1, device="cpu")
    recipe = _text_only(default_config(dataset, "recipe"), data_path)
    label = f"the sweep's re-scored pick ({trials} trials, top {top} x {rescore_seeds} seeds)"
    rows, _ = _scored_on_test({"recipe": ("CMATH text-only, defaults: recipe", recipe), name: (label, picked)},
                              seeds, cache, workers)
    rows[1]["config"] = {k: v for k, v in values.items() if v != getattr(recipe, k) and k not in
                         ("data", "data_sha256", "seed", "device", "num_threads")}
    rows[1]["rescore"] = {"picked": rescored.get("picked"), "sweep_best_val_wf1": provenance["best_val_wf1"],
                          **provenance.get("rescore", {})}
    return rows


def _text_only(config, data_path: Path):
    """`config` on this file's text, one CPU thread a run (two runs share the machine's two cores)."""
    return config.replace(data=str(data_path), modalities="t", num_threads=1)


def _scored_on_test(configs: dict, seeds: list[int], cache: Path, workers: int) -> tuple[list[dict], dict]:
    """Each config trained on each seed, test read at its best validation epoch.

    Args:
        configs: name -> (the row's label, config); the first is what the others are tested against.
        seeds, cache, workers: as `_run_all` (a config trained here before is read from `cache`).

    Returns:
        One row per config (validation and test W-F1, mean and std; the rest a paired t-test's p
        against the first), and name -> its test W-F1 per seed."""
    from scipy import stats

    jobs = {f"test-{_slug(name)}-seed{seed}": dict(config=config.replace(seed=seed).to_dict(), read_test=True)
            for name, (_, config) in configs.items() for seed in seeds}
    runs = _run_all(jobs, cache, workers)
    first = next(iter(configs))
    rows, tests = [], {}
    for name, (label, _) in configs.items():
        scores = [_at_best_validation(runs[f"test-{_slug(name)}-seed{seed}"]) for seed in seeds]
        validation, tests[name] = [v for v, _ in scores], [t for _, t in scores]
        rows.append(dict(model=label, seeds=" ".join(map(str, seeds)), val_wf1=statistics.mean(validation),
                         val_std=statistics.stdev(validation), test_wf1=statistics.mean(tests[name]),
                         test_std=statistics.stdev(tests[name]), test_values=tests[name]))
        if name != first:
            rows[-1]["test_p_vs_recipe"] = float(stats.ttest_rel(tests[name], tests[first]).pvalue)
    return rows, tests


def _slug(name: str) -> str:
    return name.replace(", ", "-").replace(" ", "-")


def _at_best_validation(curve: dict) -> tuple[float, float]:
    """(validation, test) W-F1 in percent at the run's best validation epoch (the first, on a tie)."""
    best = max(range(len(curve["val_wf1"])), key=lambda i: curve["val_wf1"][i])
    return 100 * curve["val_wf1"][best], 100 * curve["test_wf1"][best]


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("decide", "test", "search"), required=True)
    p.add_argument("--meld-dir", help="MELD transcripts + meld_minilm_all.npy (default ../shared/data/meld)")
    p.add_argument("--label", default="Emotion", help="the transcripts' label column (default Emotion)")
    p.add_argument("--seeds", help="seeds of the phase (default: decide 10-14, test 20-24)")
    p.add_argument("--workers", type=int, default=2, help="runs at a time, one CPU thread each (default 2)")
    p.add_argument("--trials", type=int, default=32, help="search: the sweep's trials (default 32)")
    p.add_argument("--space", type=Path, default=SPACE,
                   help="search: the search space (default search_spaces/meld.yaml)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.quick:
        data_path, dataset = synthetic_dataset(args.data_dir, "tiny", "meld"), "meld"
        epoch_choices, ablation_epochs, default_seeds = (2, 3), 2, {"decide": "0-1", "test": "2-3", "search": "2-3"}
    else:
        data_path = meld_text_dataset(args.data_dir, args.meld_dir, args.label)
        dataset, epoch_choices, ablation_epochs = "meld", EPOCH_CHOICES, ABLATION_EPOCHS
        default_seeds = {"decide": "10-14", "test": "20-24", "search": "20-24"}
    seeds = _seed_list(args.seeds or default_seeds[args.phase])
    cache = out / "work" / f"recipe{'-quick' if args.quick else ''}-{data_path.stem}"
    name = f"recipe-{args.phase}" + ("" if args.label == "Emotion" else f"-{args.label.lower()}")
    if args.phase == "decide":
        table, decision = _decide(data_path, dataset, seeds, epoch_choices, ablation_epochs, cache, args.workers)
        save(name, args, table, COLUMNS, data=str(data_path), seeds=seeds, decision=decision,
             notes="validation W-F1 in percent, mean ± std over the seeds; p: paired t-test, two-sided; "
                   f"a departure is kept when it is higher with p < {P_TO_KEEP}")
    elif args.phase == "search":
        trials, top, rescore_seeds = (3, 2, 2) if args.quick else (args.trials, 3, 3)
        space = QUICK_SPACE if args.quick else args.space
        rows = _search_phase(data_path, dataset, seeds, trials, top, rescore_seeds, space, out / "work", cache,
                            args.workers)
        save(name, args, rows, TEST_COLUMNS, data=str(data_path), seeds=seeds, space=str(space),
             notes="W-F1 in percent at each run's best validation epoch; test_p_vs_recipe: paired t-test over seeds")
    else:
        rows = _test_phase(data_path, dataset, seeds, cache, args.workers)
        save(name, args, rows, TEST_COLUMNS, data=str(data_path), seeds=seeds,
             notes="W-F1 in percent at each run's best validation epoch; test_p_vs_recipe: paired t-test over "
                   "seeds (logistic regression: one-sample t-test of the recipe's seeds against its score)")


if __name__ == "__main__":
    main()
