"""Figure 5, real data: the text-only model on the real MELD transcripts (precomputed MiniLM
sentence embeddings). A quick-scale sweep's best trial (validation-selected test W-F1) against
the paper's default MELD config trained on the same data, and against a per-utterance logistic
regression on the same embeddings (no context, no speaker; C and scaling picked on validation).
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
    """cmath-train --compare logreg's baseline (cmath_model.baselines), as a row."""
    from cmath_model.baselines import logistic_regression as fit

    r = fit(data, ("text",))
    scaled = "standardised, " if r["standardised"] else ""
    return dict(model=f"logistic regression ({scaled}C={r['C']:g})", selected_on="val W-F1 over C and scaling",
                runs=1, val_wf1=r["best_val_wf1"], test_wf1=r["test_wf1_at_best_val"],
                test_acc=r["test_acc_at_best_val"])


def gru_baseline(data, epochs: int, seeds: int, hidden: int = 128, lr: float = 1e-3) -> dict:
    """What a user would try first for context: a bidirectional GRU over each dialogue's
    standardised utterance embeddings with the speaker one-hot, one linear layer on top, Adam,
    the epoch picked on validation W-F1. Plain PyTorch, no CMATH code beyond the data and metrics."""
    import torch
    from torch import nn

    from cmath_model.metrics import classification_metrics

    train_split = data.splits["train"]
    mean, std = data.feature_stats(("text",))["text"]
    std = std + 1e-6
    speakers = max(9, data.max_speakers)

    class GRU(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.gru = nn.GRU(data.modality_dims["text"] + speakers, hidden, batch_first=True, bidirectional=True)
            self.out = nn.Linear(2 * hidden, data.num_classes)

        def forward(self, batch):
            x = (batch.features["text"] - mean) / std
            x = torch.cat([x, nn.functional.one_hot(batch.speaker, speakers).float()], -1) * batch.mask.unsqueeze(-1)
            packed = nn.utils.rnn.pack_padded_sequence(self.drop(x), batch.mask.sum(1), batch_first=True,
                                                       enforce_sorted=False)
            h, _ = nn.utils.rnn.pad_packed_sequence(self.gru(packed)[0], batch_first=True,
                                                    total_length=x.shape[1])
            return self.out(self.drop(h))

    @torch.no_grad()
    def score(model, split) -> dict:
        model.eval()
        ys, ps = [], []
        for batch in split.batches(16, ("text",)):
            ys.append(batch.label[batch.mask])
            ps.append(model(batch)[batch.mask].argmax(-1))
        return classification_metrics(torch.cat(ys).numpy(), torch.cat(ps).numpy(), data.num_classes)

    started = time.perf_counter()
    runs = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = GRU()
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        order = torch.Generator().manual_seed(seed)
        best = None
        for _ in range(epochs):
            model.train()
            for batch in train_split.batches(8, ("text",), order):
                loss = nn.functional.cross_entropy(model(batch)[batch.mask], batch.label[batch.mask])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            val, test = score(model, data.splits["valid"]), score(model, data.splits["test"])
            if best is None or val["wf1"] > best[0]["wf1"]:
                best = (val, test)
        runs.append(best)
    tests = [test["wf1"] for _, test in runs]
    return dict(model=f"bi-GRU over each dialogue + speaker one-hot (hidden {hidden}, lr {lr:g})",
                selected_on="val W-F1 epoch", runs=seeds, val_wf1=statistics.mean(v["wf1"] for v, _ in runs),
                test_wf1=statistics.mean(tests), test_wf1_std=statistics.stdev(tests) if seeds > 1 else None,
                test_acc=statistics.mean(t["acc"] for _, t in runs), epochs=epochs,
                fit_s=time.perf_counter() - started)


def cmath_defaults(data, epochs: int | None, seeds: int, defaults: str) -> dict:
    """CMATH text-only with MELD's defaults: the paper's reading, or this project's recipe (what
    `cmath-train --data meld.parquet` trains), each for its own epochs unless `epochs` is given."""
    from cmath_model.config import default_config
    from cmath_model.train import train

    started = time.perf_counter()
    base = default_config("meld", defaults)
    base = base.replace(modalities="t", epochs=epochs or base.epochs, data=data.path)
    runs = [train(base.replace(seed=seed), data) for seed in range(seeds)]
    tests = [r["test_wf1_at_best_val"] for r in runs]
    label = ("paper MELD settings (d 400, lr 2e-4, batch 4)" if defaults == "paper"
             else "recipe MELD defaults (paper's + docs/model.md 'Departures')")
    return dict(model=f"CMATH text-only, {label}", selected_on="val W-F1 epoch",
                runs=seeds, val_wf1=statistics.mean(r["best_val_wf1"] for r in runs), test_wf1=statistics.mean(tests),
                test_wf1_std=statistics.stdev(tests) if seeds > 1 else None,
                test_acc=statistics.mean(r["test_acc_at_best_val"] for r in runs), epochs=base.epochs,
                fit_s=time.perf_counter() - started)


def sweep(data_path: Path, trials: int, epochs: int | None, work: Path) -> dict:
    from hpo.sweep import SweepOptions, run_sweep

    options = SweepOptions(space=SPACE, data=str(data_path), num_samples=trials, max_concurrent=2, cpus_per_trial=1,
                           num_cpus=2, results=work, name="meld-text",
                           overrides={"modalities": "t", **({"epochs": epochs} if epochs else {})},
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
    p.add_argument("--epochs", type=int, help="epochs of every run (default: each CMATH row its defaults' "
                                              "epochs, the sweep its space's, the bi-GRU 15; quick 3)")
    p.add_argument("--seeds", type=int, help="seeds of the paper-default runs (default 3; quick 1)")
    args = p.parse_args(argv)
    from cmath_model.data import load_dataset

    out = Path(args.out)
    data_path = meld_text_dataset(args.data_dir, args.meld_dir)
    data = load_dataset(data_path)
    trials, epochs, seeds = (2, 3, 1) if args.quick else (12, None, 3)
    trials, epochs, seeds = args.trials or trials, args.epochs or epochs, args.seeds or seeds
    work = out / "work" / f"meld-{time.strftime('%Y%m%d-%H%M%S')}"
    rows = [logistic_regression(data)]
    print(f"meld: {rows[0]['model']}: test W-F1 {100 * rows[0]['test_wf1']:.2f}", flush=True)
    rows.append(gru_baseline(data, epochs or 15, seeds))
    print(f"meld: {rows[1]['model']}: test W-F1 {100 * rows[1]['test_wf1']:.2f}", flush=True)
    try:
        for defaults in ("paper", "recipe"):
            rows.append(cmath_defaults(data, epochs, seeds, defaults))
            print(f"meld: {defaults} defaults: test W-F1 {100 * rows[-1]['test_wf1']:.2f}", flush=True)
        rows.append(sweep(data_path, trials, epochs, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        for key in ("val_wf1", "test_wf1", "test_wf1_std", "test_acc"):
            if row.get(key) is not None:
                row[key] = float(np.round(100 * row[key], 2))
    save("meld", args, rows, COLUMNS, data=str(data_path),
         notes="W-F1 and accuracy in percent on MELD's own test split; each row trains the epochs in its "
               "epochs column and reports the test score of the best-validation epoch")


if __name__ == "__main__":
    main()
