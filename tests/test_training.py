"""The Trainer: it learns, it resumes exactly, it stops on a NaN loss, and the full model wins."""

import statistics

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

from cmath_model import CMATHConfig, NonFiniteLossError, Trainer, load_dataset, recipe_defaults
from cmath_model.data import write_dataset
from cmath_model.synth import generate
from cmath_model.train import WeightAverage, load_model, lr_factor, predict, train


def test_overfits_a_tiny_dataset(tiny):
    # Means, as the recipe: under the paper's summed norms L_re starts 10,000 times the CE on
    # these features (342-1582 dimensions, 17 utterances a dialogue): 27 % training accuracy after 40.
    cfg = CMATHConfig(d=64, dropout=0.0, lr=3e-3, batch_size=4, class_weights="none", epochs=0,
                      norm_reduction="mean")
    trainer = Trainer(cfg, tiny)
    accuracy = 0.0
    for _ in range(40):  # 40 epochs x 5 batches = 200 optimiser steps at most
        trainer.step()
        y, pred, _ = trainer.predict(tiny.splits["train"])
        accuracy = accuracy_score(y, pred)
        if accuracy >= 0.95:
            break
    assert accuracy >= 0.95


def test_epoch_record_has_the_contract_keys(tiny):
    record = Trainer(CMATHConfig(d=32, batch_size=8, epochs=0), tiny).step()
    for key in ("train_loss", "loss_ce", "loss_re", "loss_mse", "loss_kl", "val_acc", "val_wf1", "test_acc",
                "test_wf1"):
        assert np.isfinite(record[key]), key
    for key in ("val_acc", "val_wf1", "test_acc", "test_wf1"):
        assert 0.0 <= record[key] <= 1.0
    assert len(record["test_per_class_f1"]) == tiny.num_classes
    assert np.asarray(record["test_confusion"]).sum() == tiny.splits["test"].num_utterances


@pytest.mark.parametrize("schedule", [{}, {"warmup_epochs": 1.5, "lr_schedule": "cosine"}, {"ema_epochs": 1.0}])
def test_checkpoint_round_trip_equals_straight_training(tiny, tmp_path, schedule):
    # dropout: RNG state matters; the schedule: a resumed run must pick up the same learning rates;
    # the weight average: a resumed run must go on averaging from where it was (val W-F1 scores it)
    cfg = CMATHConfig(d=32, dropout=0.2, lr=1e-3, batch_size=4, epochs=4, **schedule)
    straight = Trainer(cfg, tiny)
    for _ in range(4):
        straight.step()
    first = Trainer(cfg, tiny)
    for _ in range(2):
        first.step()
    first.save(tmp_path / "ckpt")
    resumed = Trainer(cfg, tiny)
    resumed.load(tmp_path / "ckpt")
    for _ in range(2):
        resumed.step()
    assert resumed.epoch == 4
    for a, b in zip(straight.history, resumed.history):
        assert a["train_loss"] == b["train_loss"] and a["val_wf1"] == b["val_wf1"]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(straight.eval_model.state_dict().items(), resumed.eval_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_weight_average_is_the_decay_weighted_mean_of_the_weights_it_saw():
    model = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(model, decay=0.5)
    for value in (1.0, 4.0, 10.0):
        model.weight.data.fill_(value)
        average.update()  # towards the weights of the model it was made from
    # debiased: (0.25 * 1 + 0.5 * 4 + 1 * 10) / 1.75, not leaning on the weights before the first update
    assert average.model.weight.item() == pytest.approx((0.25 * 1 + 0.5 * 4 + 10) / 1.75)
    assert model.weight.item() == 10.0


def test_with_a_weight_average_the_average_is_scored_and_kept_as_best(tiny, tmp_path):
    cfg = CMATHConfig(d=32, lr=3e-3, batch_size=4, epochs=3, ema_epochs=2.0, num_threads=1)
    result = train(cfg, tiny, out_dir=tmp_path)
    trainer_weights = Trainer(cfg, tiny)  # for the keys only
    model, _ = load_model(tmp_path / "best")
    best = max(result["epochs"], key=lambda r: r["val_wf1"])
    y, pred, _ = predict(model, tiny.splits["test"], 4, torch.device("cpu"))
    from sklearn.metrics import f1_score

    assert f1_score(y, pred, average="weighted") == pytest.approx(best["test_wf1"])
    assert set(model.state_dict()) == set(trainer_weights.model.state_dict())
    # and the average is not the trained weights: a run without it scores differently
    plain = train(cfg.replace(ema_epochs=0.0), tiny)
    assert [r["val_wf1"] for r in plain["epochs"]] != [r["val_wf1"] for r in result["epochs"]]


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_zero():
    cfg = CMATHConfig(lr=1e-3, epochs=10, warmup_epochs=2, lr_schedule="cosine")
    assert lr_factor(cfg, 0.5) == pytest.approx(0.25) and lr_factor(cfg, 2.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 6.0) == pytest.approx(0.5) and lr_factor(cfg, 10.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(CMATHConfig(epochs=10), 7.3) == 1.0  # the paper's reading: constant


def test_the_optimiser_runs_at_the_scheduled_rate(tiny):
    trainer = Trainer(CMATHConfig(d=16, lr=1e-3, batch_size=4, epochs=10, warmup_epochs=4, num_threads=1), tiny)
    trainer.step()  # the last step of epoch 1 ran at a quarter of the way through the warm-up
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.25e-3)


def test_best_checkpoint_holds_weights_and_test_predictions(tiny, tmp_path):
    cfg = CMATHConfig(d=32, batch_size=8, epochs=3, checkpoint_every=1)
    result = train(cfg, tiny, out_dir=tmp_path)
    best = tmp_path / "best"
    assert (best / "model.pt").exists() and (best / "config.yaml").exists()
    assert not (tmp_path / "last").exists()  # resume state is gone once the run has finished
    assert not (best / "trainer.pt").exists()
    preds = np.load(best / "test_predictions.npz")
    assert len(preds["label"]) == tiny.splits["test"].num_utterances
    best_record = max(result["epochs"], key=lambda r: r["val_wf1"])
    from sklearn.metrics import f1_score

    assert f1_score(preds["label"], preds["pred"], average="weighted") == pytest.approx(best_record["test_wf1"])


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    utts, shape = generate("iemocap", "tiny")
    utts.features = {m: x * 1e37 for m, x in utts.features.items()}  # finite, but overflows in the model
    path = write_dataset(tmp_path / "huge.parquet", utts, dataset="iemocap", classes=list(shape.classes),
                         source="test", source_sha256="", split_seed=0)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, batch 1.*lower lr"):
        train(CMATHConfig(d=16, epochs=1), load_dataset(path))


@pytest.mark.slow
def test_full_model_beats_text_only_and_no_context(small):
    """The synthetic data rewards context and all modalities; the model must find both.

    One seed's test W-F1 here spreads by about 0.045 (16 seeds: full 0.677, text only 0.603, the
    same before and after the model ran on packed utterances, which drew other dropout masks), so
    the means are over six seeds: two let a new random stream fail a real margin of 0.07."""
    def score(**kw) -> float:
        results = []
        for seed in range(6):
            cfg = recipe_defaults("iemocap").replace(d=64, epochs=10, dropout=0.1, lr=2e-3, batch_size=4,
                                                    seed=seed, **kw)
            results.append(train(cfg, small)["test_wf1_at_best_val"])
        return statistics.fmean(results)

    full, text_only, no_context = score(), score(modalities="t"), score(context="none")
    print(f"test W-F1: full {full:.3f}, text-only {text_only:.3f}, context none {no_context:.3f}")
    assert full > text_only + 0.02
    assert full > no_context + 0.02
