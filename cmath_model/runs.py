"""Library behind `cmath-train` and `cmath-eval`: resolve the data, train one or more seeds,
aggregate them, write metrics.json, and (optionally) log the run to MLflow."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from .config import DATASETS, CMATHConfig, default_config, paper_defaults
from .data import Dataset, dataset_name, load_dataset, pin_data
from .errors import ConfigError
from .metrics import classification_metrics
from .synth import default_dataset_path
from .tracking import (
    describe_run,
    log_artifacts_once,
    log_metrics,
    metrics_at,
    mlflow_experiment,
    open_run,
    tracking_client,
)
from .train import load_model, pick_device, predict, train

DEFAULT_RESULTS = Path("results")
LONG_DIALOGUE = 25  # utterances per dialogue: IEMOCAP has about 48, MELD about 10
SUMMARY_KEYS = ("best_val_wf1", "test_wf1_at_best_val", "test_acc_at_best_val", "best_test_wf1", "best_epoch")


def resolve_data(config: CMATHConfig, results_dir: str | Path = DEFAULT_RESULTS,
                 fit_modalities: bool = False) -> tuple[CMATHConfig, Dataset]:
    """Load the config's dataset (or generate the embedded default) and pin its path and hash.

    With fit_modalities, a config whose modalities the file lacks is narrowed to what the file
    has (a text-only file runs the text-only model); otherwise that is an error.
    """
    data = load_dataset(config.data or default_dataset_path(results_dir, config.dataset), config.data_sha256)
    return pin_data(config, data, fit_modalities), data


def defaults_for(path: str | None, defaults: str = "recipe") -> tuple[CMATHConfig, str]:
    """The defaults for the dataset a file holds (IEMOCAP's when no file is given), and one line
    that says which were chosen and why, for the start of training.

    A file that is neither IEMOCAP nor MELD (`from-csv` with other labels, a pickle of another
    corpus) gets MELD's, unless it is multimodal with long dialogues: IEMOCAP's settings (lr
    3e-3, 16 dialogues per batch, 60 epochs, class weights) are tuned for 50-utterance dyadic
    sessions and collapse on short transcript dialogues, which MELD's fit."""
    if path is None:
        config = default_config("iemocap", defaults)
        return config, f"defaults: {defaults} for IEMOCAP (the built-in synthetic IEMOCAP-shaped set)"
    name = dataset_name(path)
    if name in DATASETS:
        return default_config(name, defaults), f"defaults: {defaults} for {name.upper()} (the file's dataset)"
    data = load_dataset(path)
    train_split = data.splits["train"]
    per_dialogue = train_split.num_utterances / max(train_split.num_dialogues, 1)
    modalities = "".join(m[0] for m in data.modality_dims)
    if modalities == "t":
        closer, rule = "meld", "text-only data takes MELD's"
    elif per_dialogue >= LONG_DIALOGUE:
        closer = "iemocap"
        rule = f"multimodal data with {LONG_DIALOGUE} or more utterances per dialogue takes IEMOCAP's"
    else:
        closer, rule = "meld", f"dialogues under {LONG_DIALOGUE} utterances take MELD's"
    kind = "text only" if modalities == "t" else f"modalities {modalities}"
    line = (f"defaults: {defaults} for {closer.upper()} ({data.name} data: {kind}, {per_dialogue:.1f} utterances "
            f"per dialogue; {rule})")
    return default_config(closer, defaults), line


def describe_config(config: CMATHConfig) -> str:
    """The settings a person checks first, on one line."""
    return (f"d {config.d}, lr {config.lr:g}, batch {config.batch_size}, epochs {config.epochs}, "
            f"gamma1 {config.gamma1:g}, gamma2 {config.gamma2:g}, dropout {config.dropout:g}, "
            f"class weights {config.class_weights}, modalities {config.modalities}"
            + (f", input dropout {config.input_dropout:g}" if config.input_dropout else "")
            + (f", weight average over {config.ema_epochs:g} epochs" if config.ema_epochs else ""))


def aggregate(per_seed: list[dict]) -> dict:
    """Mean of the summary keys over seeds, `<key>_std` (ddof 1), and per-epoch means."""
    if len(per_seed) == 1:
        return per_seed[0]
    result: dict = {}
    for key in SUMMARY_KEYS:
        values = [r[key] for r in per_seed]
        result[key] = statistics.fmean(values)
        result[f"{key}_std"] = statistics.stdev(values)
    result["best_test_wf1_note"] = per_seed[0]["best_test_wf1_note"]
    n_epochs = min(len(r["epochs"]) for r in per_seed)
    numeric = [k for k, v in per_seed[0]["epochs"][0].items() if isinstance(v, (int, float))]
    result["epochs"] = [{k: statistics.fmean(r["epochs"][i][k] for r in per_seed) for k in numeric}
                        for i in range(n_epochs)]
    result["num_parameters"] = per_seed[0]["num_parameters"]
    result["seeds"] = [r["seed"] for r in per_seed]
    result["per_seed"] = per_seed
    return result


def train_seeds(config: CMATHConfig, data: Dataset, seeds: int, out_dir: str | Path,
                log: Callable[[str], None] | None = print, mlflow_uri: str | None = None,
                experiment: str = "cmath-train", tags: dict[str, str] | None = None) -> dict:
    """Train `seeds` runs (seed, seed+1, ...) into out_dir/seed<K>/ and write out_dir/metrics.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.to_yaml(out / "config.yaml")
    tracker = _MlflowRun(mlflow_uri, experiment, config, out, tags or {}) if mlflow_uri else None
    if tracker and log:
        log(tracker.describe())
    per_seed = []
    started = time.time()
    try:
        for k in range(seeds):
            seed_config = config.replace(seed=config.seed + k)
            if log:
                log(f"seed {seed_config.seed} ({k + 1}/{seeds})")
            reporter = tracker.reporter(seed_config.seed) if tracker else None
            result = train(seed_config, data, reporter=reporter, out_dir=out / f"seed{seed_config.seed}", log=log)
            per_seed.append(result)
        summary = aggregate(per_seed)
        summary["wall_seconds"] = time.time() - started
        summary["config"] = config.to_dict()
        if tracker:
            summary["mlflow"] = tracker.where()
        (out / "metrics.json").write_text(json.dumps(summary, indent=1))
        if tracker:
            tracker.finish(summary, "FINISHED")
    except BaseException:
        if tracker:
            tracker.finish(None, "FAILED")
        raise
    return summary


class _MlflowRun:
    """One MLflow run per `cmath-train` invocation: params, per-epoch metrics (step = epoch,
    suffixed by seed when there are several), the summary and the best checkpoints."""

    def __init__(self, uri: str, experiment: str, config: CMATHConfig, out: Path, tags: dict[str, str]):
        self.client = tracking_client(uri)
        self.out = out
        self.uri, self.experiment = uri, experiment
        experiment_id = mlflow_experiment(self.client, experiment, uri)
        self.run_id = open_run(self.client, experiment_id, out.name, {"cmath.kind": "final_training", **tags},
                               config.to_dict())

    def where(self) -> dict:
        return {"uri": self.uri, "experiment": self.experiment, "run_id": self.run_id, "run_name": self.out.name}

    def describe(self) -> str:
        return describe_run(self.where())

    def reporter(self, seed: int) -> Callable[[dict], None]:
        def report(record: dict) -> None:
            values = {k: v for k, v in record.items() if k != "epoch"}
            log_metrics(self.client, self.run_id, metrics_at(values, record["epoch"], suffix=f"/seed{seed}"))

        return report

    def finish(self, summary: dict | None, status: str) -> None:
        if summary is not None:
            log_metrics(self.client, self.run_id, metrics_at(summary, 0))
            log_artifacts_once(self.client, self.run_id, self.out)
        self.client.set_terminated(self.run_id, status)


def welch(ours: list[float], theirs: list[float]) -> dict:
    """Welch's t-test (unequal variances), as behind the paper's significance marks. Against a
    deterministic baseline (one value for every seed) it is the one-sample t-test of `ours`
    against that value, computed as such (scipy warns of lost precision on a constant sample)."""
    from scipy.stats import ttest_1samp, ttest_ind

    if len(set(theirs)) == 1:
        result = ttest_1samp(ours, theirs[0])
    else:
        result = ttest_ind(ours, theirs, equal_var=False)
    return {"t": float(result.statistic), "p": float(result.pvalue)}


def compare_with_baseline(against: str, summary: dict, config: CMATHConfig, data: Dataset, seeds: int, out: Path,
                          epochs: int | None = None, log: Callable[[str], None] | None = None,
                          mlflow_uri: str | None = None, experiment: str = "cmath-train",
                          tags: dict[str, str] | None = None) -> tuple[dict, dict]:
    """Train a baseline on the same data and seeds as `summary`'s run, test the difference, and
    add both to out/metrics.json.

    Args:
        against: `paper` (the paper's settings, with the run's data, modalities, seeds and, when
            given, `epochs`) or `logreg` (a per-utterance logistic regression on the same features).
        summary: the run's multi-seed summary (train_seeds); gains the comparison.
        config, data, seeds, out: the run's config, data, seed count and folder.
        epochs: the epochs given on the command line, if any (the paper baseline runs as many).
        log, mlflow_uri, experiment, tags: as train_seeds (the paper baseline is logged like the run).

    Returns:
        The baseline's summary, and per test score the two sides' values with Welch's t and p.
    """
    if against == "paper":
        paper = paper_defaults(config.dataset).replace(
            data=config.data, data_sha256=config.data_sha256, modalities=config.modalities, seed=config.seed,
            device=config.device, num_threads=config.num_threads, **({"epochs": epochs} if epochs is not None else {}))
        theirs = train_seeds(paper, data, seeds, out / "paper", log=log, mlflow_uri=mlflow_uri,
                             experiment=experiment, tags={**(tags or {}), "cmath.kind": "paper_baseline"})
        compared = compare_runs(summary, theirs)
        summary["compare"] = {"against": "paper", "paper_summary": {k: v for k, v in theirs.items() if k != "epochs"},
                              "welch": compared}
    elif against == "logreg":
        from .baselines import logistic_regression_seeds

        theirs = logistic_regression_seeds(data, config.modality_names, seeds)
        compared = compare_runs(summary, theirs, name="logreg")
        summary["compare_logreg"] = {"against": "logreg", "logreg_summary": theirs, "welch": compared}
    else:
        raise ConfigError(f"--compare {against}: use paper or logreg")
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    return theirs, compared


def compare_runs(ours: dict, theirs: dict, name: str = "paper") -> dict:
    """Per-seed test scores of two multi-seed summaries side by side (theirs under `name`), with
    Welch p-values."""
    compared = {}
    for key in ("test_wf1_at_best_val", "test_acc_at_best_val"):
        a = [r[key] for r in ours["per_seed"]]
        b = [r[key] for r in theirs["per_seed"]]
        compared[key] = {"ours": a, name: b, **welch(a, b)}
    return compared


def evaluate_checkpoint(checkpoint: str | Path, data_path: str | None = None, batch_size: int = 16) -> dict:
    """Test metrics of a best-checkpoint folder on its own data (or another file of the same shape)."""
    model, config = load_model(checkpoint)
    data = load_dataset(data_path or config.data, None if data_path else config.data_sha256)
    data.require_modalities(config.modality_names)
    for m in config.modality_names:
        expected = model.reconstruction[m].down.in_channels
        if data.modality_dims[m] != expected:
            raise ConfigError(f"{data.path}: {m} vectors are {data.modality_dims[m]}-d but the checkpoint "
                              f"expects {expected}-d; evaluate on data of the same shape")
    y, pred, _ = predict(model, data.splits["test"], batch_size, pick_device("cpu"))
    metrics = classification_metrics(y, pred, data.num_classes)
    metrics.update(checkpoint=str(checkpoint), data=data.path, classes=data.classes,
                   num_utterances=int(len(y)), test_acc=metrics.pop("acc"), test_wf1=metrics.pop("wf1"))
    return metrics
