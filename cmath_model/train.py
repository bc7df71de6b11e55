"""Training one CMATH model: a Trainer with step/save/load, and `train`, a plain loop over it.

A sweep wraps the same Trainer as a Ray trainable, so everything a trial needs (resume,
best-epoch checkpoint, per-epoch metrics) lives here.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .config import CMATHConfig
from .data import Dataset, Split, load_dataset
from .errors import ConfigError, DataError, NonFiniteLossError
from .metrics import classification_metrics
from .model import CMATH, cmath_loss

# Per-epoch means over training utterances: the loss terms, and the fused sample's sigma and |mu|.
TRAIN_KEYS = ("train_loss", "loss_ce", "loss_re", "loss_mse", "loss_kl", "sigma_mean", "mu_abs_mean")
MIN_SPEAKER_SLOTS = 9  # MELD's maximum; a model always has room for it
# config.adam -> torch.optim.Adam's switches. `fused` updates every tensor in one kernel each;
# torch's CPU default (`plain`) runs about ten small operations per tensor, which took 19 % of a
# MELD recipe epoch on one CPU thread (benchmarks.epoch --profile).
ADAM_IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "plain": {"foreach": False}}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Trainer:
    """Owns model, optimiser and RNG state; `step()` is one epoch (train, then valid and test)."""

    def __init__(self, config: CMATHConfig, data: Dataset, device: str | torch.device | None = None,
                 keep_best: bool = False):
        data.require_modalities(config.modality_names)
        if config.dataset != data.name and data.name in ("iemocap", "meld"):
            raise ConfigError(f"config is for dataset '{config.dataset}' but {data.path} holds '{data.name}'; "
                              f"set dataset: {data.name}")
        self.config = config
        self.data = data
        self.device = torch.device(device) if device is not None else pick_device(config.device)
        # On every device: a GPU trial batches and scores on the CPU too, and trials packed on one
        # GPU node must not each take every core.
        torch.set_num_threads(config.num_threads or available_cpus())
        _seed_everything(config.seed)
        self.speaker_slots = max(MIN_SPEAKER_SLOTS, data.max_speakers)
        self.model = CMATH(config, data.modality_dims, data.num_classes, self.speaker_slots)
        if config.input_norm == "standardize":
            self.model.set_input_stats(data.feature_stats(self.model.modalities))
        self.model.to(self.device)
        # What the training steps call; `model` itself (uncompiled) is what is saved and averaged.
        self.training_model, why_not = compiled(self.model, config.compile, self.device)
        if why_not:
            print(f"warning: {why_not}", file=sys.stderr, flush=True)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                          **ADAM_IMPLEMENTATIONS[config.adam])
        self.steps_per_epoch = math.ceil(data.splits["train"].num_dialogues / config.batch_size)
        self.average = (WeightAverage(self.model, max(0.0, 1.0 - 1.0 / (config.ema_epochs * self.steps_per_epoch)))
                        if config.ema_epochs else None)
        self.shuffle = torch.Generator().manual_seed(config.seed)
        self.class_weight = self._class_weight()
        self.epoch = 0
        self.history: list[dict] = []
        self.best: dict | None = None  # the best-validation epoch's metrics
        self.improved = False
        self.best_test_predictions: dict | None = None
        # With keep_best, the best epoch's weights stay in memory (a CPU copy), so `save_best` can
        # write them whenever it is asked, not only in the epoch they were best (sweeps write them
        # with their checkpoints instead of at every improvement).
        self.keep_best = keep_best
        self.best_model_state: dict | None = None

    def _class_weight(self) -> torch.Tensor | None:
        if self.config.class_weights == "none":
            return None
        freq = self.data.class_frequencies()
        power = 0.5 if self.config.class_weights == "inverse_sqrt_frequency" else 1.0
        weight = np.where(freq > 0, 1.0 / np.maximum(freq, 1e-12) ** power, 0.0)
        return torch.tensor(weight / weight[freq > 0].mean(), dtype=torch.float32, device=self.device)

    @property
    def eval_model(self) -> CMATH:
        """The weights that are scored and kept as best/: the moving average when there is one."""
        return self.average.model if self.average is not None else self.model

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # ------------------------------------------------------------------ one epoch
    def step(self) -> dict:
        """Train one epoch, then evaluate valid and test. Returns the epoch's metrics record."""
        started = time.perf_counter()
        losses = self.train_epoch()
        train_seconds = time.perf_counter() - started
        self.epoch += 1
        valid = self.evaluate(self.data.splits["valid"])
        test = self.evaluate(self.data.splits["test"])
        record = {
            "epoch": self.epoch,
            **losses,
            "val_acc": valid["acc"], "val_wf1": valid["wf1"],
            "test_acc": test["acc"], "test_wf1": test["wf1"],
            "val_per_class_f1": valid["per_class_f1"], "test_per_class_f1": test["per_class_f1"],
            "val_confusion": valid["confusion"], "test_confusion": test["confusion"],
            "train_seconds": train_seconds,
            "epoch_seconds": time.perf_counter() - started,
        }
        self.improved = self.best is None or record["val_wf1"] > self.best["val_wf1"]
        if self.improved:
            self.best = record
            self.best_test_predictions = test["predictions"]
            if self.keep_best:
                self.best_model_state = {k: v.detach().to("cpu", copy=True)
                                         for k, v in self.eval_model.state_dict().items()}
        self.history.append(record)
        return record

    def train_epoch(self) -> dict:
        """One pass over the training split (the optimiser's steps only, no evaluation and no
        epoch count: `step` adds those). Returns the epoch's mean training losses.

        Nothing in the loop reads a value back from the device: the losses are summed there and
        read once at the end, with the first step whose loss was not finite (on a GPU each read
        would wait for every kernel queued before it)."""
        self.model.train()
        cfg = self.config
        totals = torch.zeros(len(TRAIN_KEYS), device=self.device)  # utterance-weighted sums of TRAIN_KEYS
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first step with a non-finite loss
        total_utterances = 0
        split = self.data.splits["train"]
        for k, batch in enumerate(split.batches(cfg.batch_size, self.model.modalities, self.shuffle, packed=True)):
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, self.epoch + (k + 1) / self.steps_per_epoch)
            batch = batch.to(self.device)
            with autocast(cfg.precision, self.device):
                out = self.training_model(batch.features, batch.speaker, batch.mask, batch.positions)
                terms = cmath_loss(out, batch.label, batch.mask, cfg, self.class_weight)
            loss = terms["loss"]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            if self.average is not None:
                self.average.update()
            n = batch.num_utterances
            total_utterances += n
            with torch.no_grad():  # the fused sample's noise against its signal (Eq. 17) beside the losses
                values = torch.stack([loss, *(terms[key] for key in TRAIN_KEYS[1:5]),
                                      out.sigma_x.mean(), out.mu_x.abs().mean()])
                totals.add_(values, alpha=n)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), k, first_bad)
        bad = int(first_bad)
        if bad >= 0:
            raise NonFiniteLossError(
                f"training loss became non-finite at epoch {self.epoch + 1}, batch {bad + 1} "
                f"(lr={cfg.lr:g}, gamma1={cfg.gamma1:g}, gamma2={cfg.gamma2:g}); lower lr or set grad_clip")
        means = (totals / max(total_utterances, 1)).tolist()
        return dict(zip(TRAIN_KEYS, means))

    def predict(self, split: Split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with autocast(self.config.precision, self.device):
            return predict(self.eval_model, split, self.config.eval_batch_size, self.device)

    def evaluate(self, split: Split) -> dict:
        y, pred, prob = self.predict(split)
        metrics = classification_metrics(y, pred, self.data.num_classes)
        metrics["predictions"] = {"label": y, "pred": pred, "prob": prob}
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str | Path) -> Path:
        """A resumable checkpoint: model, optimiser, epoch, history and every RNG state.

        trainer.pt holds only tensors and plain values (dicts, lists, tuples, str, int, float,
        None), so it loads with torch.load(weights_only=True); numpy's RNG state is stored as
        such values (its keys as a tensor) and rebuilt by `load`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best,
            "average": self.average.state_dict() if self.average is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "shuffle": self.shuffle.get_state(),
                "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
                "python": random.getstate(),
            },
        }
        _atomic_torch_save(state, directory / "trainer.pt")
        self.config.to_yaml(directory / "config.yaml")
        return directory

    def load(self, directory: str | Path) -> None:
        # On the CPU: RNG states must be CPU tensors; load_state_dict moves weights and Adam's
        # moments to the model's device.
        state = load_weights(Path(directory) / "trainer.pt", map_location="cpu")
        load_model_state(self.model, state["model"], Path(directory) / "trainer.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = state["epoch"]
        self.history = state["history"]
        self.best = state["best"]
        if self.average is not None and state.get("average") is not None:
            self.average.load_state_dict(state["average"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.shuffle.set_state(rng["shuffle"])
        numpy_state = rng["numpy"]
        np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
        random.setstate(rng["python"])

    def save_best(self, directory: str | Path) -> Path:
        """The best-validation epoch: weights, config, its metrics and its test predictions
        (the weights kept in memory with keep_best, else the model's current ones)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = self.best_model_state if self.best_model_state is not None else self.eval_model.state_dict()
        _atomic_torch_save({"model": weights, "modality_dims": self.data.modality_dims,
                            "num_classes": self.data.num_classes,
                            "max_speakers": self.speaker_slots},
                           directory / "model.pt")
        self.config.to_yaml(directory / "config.yaml")
        preds = self.best_test_predictions
        np.savez(directory / "test_predictions.npz", label=preds["label"], pred=preds["pred"], prob=preds["prob"],
                 dialogue_lengths=self.data.splits["test"].lengths.numpy())
        (directory / "metrics.json").write_text(json.dumps({**self.best, "classes": self.data.classes}, indent=1))
        return directory

    def load_best(self, directory: str | Path) -> None:
        """Take back what `save_best` wrote (after `load`, whose history already holds the metrics)."""
        directory = Path(directory)
        state = load_weights(directory / "model.pt", map_location="cpu")
        self.best_model_state = state["model"] if self.keep_best else None
        with np.load(directory / "test_predictions.npz") as preds:
            self.best_test_predictions = {k: preds[k] for k in ("label", "pred", "prob")}


class WeightAverage:
    """A debiased exponential moving average of the model's weights, updated after every
    optimiser step (Polyak averaging; not in the paper). On small real sets the trained weights
    swing from epoch to epoch, so the epoch that validation picks is partly noise; the average
    moves smoothly and scores higher (MELD, seeds 10-14, epochs 6-12: validation W-F1 moves 1.0
    points an epoch without it, 0.56 with it; best validation 55.82 against 55.24, p 0.03).

    Debiased: after n updates it is the decay-weighted mean of those n weights (the first update
    copies them), not a mean that still leans on the initial weights, so early epochs score
    their own training, which ASHA's early rungs compare."""

    def __init__(self, model: CMATH, decay: float):
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        # (averaged, trained) tensor pairs, found once: the tensors stay the same objects for the
        # whole run (load_state_dict copies into them), and a state_dict per step cost as much as the lerps.
        self.pairs = [(a, t) for a, t in zip(self.model.state_dict(keep_vars=True).values(),
                                             model.state_dict(keep_vars=True).values()) if a.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average towards the trained model's current weights."""
        self.updates += 1
        rate = (1.0 - self.decay) / (1.0 - self.decay ** self.updates)  # 1 at the first update
        for averaged, trained in self.pairs:
            averaged.lerp_(trained, rate)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


def compiled(model: CMATH, mode: str, device: torch.device) -> tuple[torch.nn.Module, str | None]:
    """`model` under torch.compile(mode), or `model` itself and why not.

    Args:
        model: the model to compile; it stays uncompiled itself (its state_dict keys unchanged).
        mode: config.compile: none | default | reduce-overhead.
        device: where it runs: TorchInductor writes C++ (CPU) or Triton (GPU) kernels and builds
            them with a C/C++ compiler at run time, so without one training runs uncompiled.

    Returns:
        (the module to call for training, None) or (model, a one-line reason it runs uncompiled).
    """
    if mode == "none":
        return model, None
    wanted = ("CXX", ("g++", "clang++", "c++")) if device.type == "cpu" else ("CC", ("cc", "gcc", "clang"))
    names = ([os.environ[wanted[0]]] if os.environ.get(wanted[0]) else []) + list(wanted[1])
    if not any(shutil.which(name) for name in names):
        return model, (f"compile: {mode} needs a C/C++ compiler at run time and none of {', '.join(names)} was "
                       f"found; training runs uncompiled (install one, e.g. apt install g++, or set compile: none)")
    # dynamic: every batch has its own number of utterances and dialogue length
    return torch.compile(model, mode=mode, dynamic=True), None


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The forward pass's precision: with bf16, matrix products run in bfloat16 (autocast's
    list), while weights, optimiser state, norms, softmaxes and losses stay in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def lr_factor(config: CMATHConfig, epoch: float) -> float:
    """lr / config.lr after `epoch` epochs of steps (> 0). A function of the epoch alone, so a
    resumed run follows the same schedule without saving one."""
    warmup = config.warmup_epochs
    if warmup and epoch < warmup:
        return epoch / warmup
    if config.lr_schedule == "cosine" and config.epochs > warmup:
        done = min(1.0, (epoch - warmup) / (config.epochs - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * done))
    return 1.0


@torch.inference_mode()
def predict(model: CMATH, split: Split, batch_size: int, device: torch.device
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, predictions, class probabilities) of every real utterance, in dialogue order."""
    model.eval()
    labels, probs = [], []
    for batch in split.batches(batch_size, model.modalities, packed=True):
        batch = batch.to(device)
        out = model(batch.features, batch.speaker, batch.mask, batch.positions)
        labels.append(batch.label)
        probs.append(torch.softmax(out.logits_x.float(), dim=-1))
    prob = torch.cat(probs).cpu()  # one copy back from the device, after every batch
    return torch.cat(labels).cpu().numpy(), prob.argmax(-1).numpy(), prob.numpy()


def load_weights(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """torch.load restricted to tensors and plain values (weights_only=True). Checkpoints come
    from shared storage and MLflow artifacts: unpickling anything more would let whoever can
    write there run code here."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if found:
            raise DataError(f"{path}: refusing to load: it holds pickled code ({found[1]}), not only weights "
                            "(torch.load weights_only); re-create it with this version of cmath-hpo or get it "
                            "from a source you trust") from exc
        raise DataError(f"{path}: refusing to load: not a weights-only torch checkpoint (corrupt, or not "
                        "written by torch.save); re-create it with this version of cmath-hpo") from exc


def load_model_state(model: CMATH, weights: dict, path: Path) -> None:
    """load_state_dict that takes checkpoints from before input standardisation (they lack its
    buffers, whose default is the identity) and names the file when anything else differs."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith(("input_mean", "input_std"))]
    if missing or unexpected:
        raise DataError(f"{path}: weights do not match the model its config.yaml builds "
                        f"({(missing or unexpected)[0]} {'missing' if missing else 'unexpected'}); "
                        "re-create the checkpoint or restore its config.yaml")


def _atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[CMATH, CMATHConfig]:
    """Rebuild a model from a `save_best` directory (what cmath-eval and reports load)."""
    from .config import load_config

    checkpoint = Path(checkpoint)
    if not (checkpoint / "model.pt").exists():
        raise ConfigError(f"{checkpoint}: no model.pt here; pass a best-checkpoint folder written by cmath-train")
    config = load_config(checkpoint / "config.yaml")
    state = load_weights(checkpoint / "model.pt", map_location=device)
    model = CMATH(config, state["modality_dims"], state["num_classes"], state["max_speakers"]).to(device)
    load_model_state(model, state["model"], checkpoint / "model.pt")
    model.eval()
    return model, config


# ------------------------------------------------------------------ the plain loop
def summarize(history: list[dict]) -> dict:
    """metrics.json's top level: validation-selected test scores and the paper-style best test epoch."""
    best = max(history, key=lambda r: r["val_wf1"])
    return {
        "best_val_wf1": best["val_wf1"],
        "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"],
        "test_wf1_at_best_val": best["test_wf1"],
        "test_acc_at_best_val": best["test_acc"],
        # Papers in this family report the best test epoch; it peeks at test, so it is labelled.
        "best_test_wf1": max(r["test_wf1"] for r in history),
        "best_test_wf1_note": "paper-style: best test epoch, selected on test (optimistic)",
    }


def train(config: CMATHConfig, data: Dataset | None = None, reporter: Callable[[dict], None] | None = None,
          out_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Train `config.epochs` epochs. Writes best/ to out_dir, and last/ (resume state) every
    checkpoint_every epochs, which is removed once the last epoch is done."""
    if data is None:
        if config.data is None:
            raise ConfigError("config has no data path: set data: or pass --data")
        data = load_dataset(config.data, config.data_sha256)
    trainer = Trainer(config, data)
    out = Path(out_dir) if out_dir is not None else None
    for _ in range(config.epochs):
        record = trainer.step()
        if out is not None and trainer.improved:
            trainer.save_best(out / "best")
        if out is not None and config.checkpoint_every and trainer.epoch % config.checkpoint_every == 0:
            trainer.save(out / "last")
        if log is not None:
            log(format_epoch(record))
        if reporter is not None:
            reporter(record)
    if not trainer.history:
        raise ConfigError("epochs is 0: nothing was trained")
    if out is not None and (out / "last").is_dir():
        # The resume state (weights plus Adam's, 3x best/'s size) is for an interrupted run; a
        # finished one is done with it: 243 MB per seed at d 500, 1.2 GB of a 5-seed retrain.
        shutil.rmtree(out / "last")
    result = {**summarize(trainer.history), "epochs": trainer.history,
              "num_parameters": trainer.num_parameters, "seed": config.seed}
    return result


def format_epoch(r: dict) -> str:
    """One line per epoch; scores in percent, as every line a person reads (files keep fractions)."""
    return (f"epoch {r['epoch']:3d}  loss {r['train_loss']:.4f}  val ACC {100 * r['val_acc']:.2f} "
            f"W-F1 {100 * r['val_wf1']:.2f}  test ACC {100 * r['test_acc']:.2f} W-F1 {100 * r['test_wf1']:.2f}"
            f"  ({r['epoch_seconds']:.1f}s)")
