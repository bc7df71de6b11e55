"""Figure 5, real data: the text-only model on the real MELD transcripts (precomputed MiniLM
sentence embeddings). A quick-scale sweep's best trial (validation-selected test W-F1) against
the paper's default MELD config trained on the same data, and against a per-utterance logistic
regression on the same embeddings (no context, no speaker; C picked on validation).
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from .common import meld_text_dataset, parser, save

SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "meld.yaml"
COLUMNS = ["model", "selected_on", "runs", "val_wf1", "test_wf1", "test_wf1_std", "test_acc", "epochs", "fit_s"]


def logistic_regression(data) -> dict:
    from sklearn.linear_model import LogisticRegression

    from cmath_model.metrics import classification_metrics

    def xy(split: str):
        s = data.splits[split]
        return s.features["text"][:-1].numpy(), s.label[:-1].numpy()  # the last row is padding

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = xy("train"), xy("valid"), xy("test")
    best = None
    for c in (0.01, 0.1, 1.0, 10.0, 100.0):
        model = LogisticRegression(C=c, max_iter=2000).fit(x_train, y_train)
        val = classification_metrics(y_val, model.predict(x_val), data.num_classes)["wf1"]
        if best is None or val > best[0]:
            best = (val, c, model)
    val, c, model = best
    test = classification_metrics(y_test, model.predict(x_test), data.num_classes)
    return dict(model=f"logistic regression (C={c:g})", selected_on="val W-F1 over C", runs=1, val_wf1=val,
                test_wf1=test["wf1"], test_acc=test["acc"])


def paper_default(data, epochs: int, seeds: int) -> dict:
    from cmath_model.config import paper_defaults
    from cmath_model.train import train

    started = time.perf_counter()
    runs = [train(paper_defaults("meld").replace(modalities="t", epochs=epochs, seed=seed, data=data.path), data)
            for seed in range(seeds)]
    tests = [r["test_wf1_at_best_val"] for r in runs]
    return dict(model="CMATH text-only, paper MELD defaults (d 400, lr 2e-4, batch 4)", selected_on="val W-F1 epoch",
                runs=seeds, val_wf1=statistics.mean(r["best_val_wf1"] for r in runs), test_wf1=statistics.mean(tests),
                test_wf1_std=statistics.stdev(tests) if seeds > 1 else None,
                test_acc=statistics.mean(r["test_acc_at_best_val"] for r in runs), epochs=epochs,
                fit_s=time.perf_counter() - started)


def sweep(data_path: Path, trials: int, epochs: int, work: Path) -> dict:
    from hpo.sweep import SweepOptions, run_sweep

    options = SweepOptions(space=SPACE, data=str(data_path), num_samples=trials, max_concurrent=2, cpus_per_trial=1,
                           num_cpus=2, results=work, name="meld-text", overrides={"modalities": "t", "epochs": epochs},
                           command="benchmarks.meld")
    outcome = run_sweep(options, log=print)
    best = outcome.best
    return dict(model=f"CMATH text-only, best of a {trials}-trial sweep (search_spaces/meld.yaml)",
                selected_on="val W-F1 over trials and epochs", runs=1, val_wf1=best["best_val_wf1"],
                test_wf1=best["test_wf1_at_best_val"], test_acc=best["test_acc_at_best_val"],
                epochs=int(best["best_epoch"]), fit_s=outcome.fit_seconds,
                best_params={k[6:]: best[k] for k in best if k.startswith("param_")}, counts=outcome.counts)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--meld-dir", help="MELD transcripts + meld_minilm_all.npy (default ../shared/data/meld)")
    p.add_argument("--trials", type=int, help="sweep trials (default 12; quick 2)")
    p.add_argument("--epochs", type=int, help="epochs per run (default 15; quick 3)")
    p.add_argument("--seeds", type=int, help="seeds of the paper-default runs (default 3; quick 1)")
    args = p.parse_args(argv)
    from cmath_model.data import load_dataset

    out = Path(args.out)
    data_path = meld_text_dataset(args.data_dir, args.meld_dir)
    data = load_dataset(data_path)
    trials, epochs, seeds = (2, 3, 1) if args.quick else (12, 15, 3)
    trials, epochs, seeds = args.trials or trials, args.epochs or epochs, args.seeds or seeds
    work = out / "work" / f"meld-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = [logistic_regression(data)]
    print(f"meld: {rows[0]['model']}: test W-F1 {100 * rows[0]['test_wf1']:.2f}", flush=True)
    try:
        rows.append(paper_default(data, epochs, seeds))
        print(f"meld: paper defaults: test W-F1 {100 * rows[1]['test_wf1']:.2f}", flush=True)
        rows.append(sweep(data_path, trials, epochs, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        for key in ("val_wf1", "test_wf1", "test_wf1_std", "test_acc"):
            if row.get(key) is not None:
                row[key] = float(np.round(100 * row[key], 2))
    save("meld", args, rows, COLUMNS, data=str(data_path),
         notes="W-F1 and accuracy in percent on MELD's own test split; CMATH rows train "
               f"{epochs} epochs per run and report the test score of the best-validation epoch")


if __name__ == "__main__":
    main()
