"""Figure 2, training speed: milliseconds per training epoch and per utterance for CMATH at d 500,
batch 16, on the default synthetic IEMOCAP-shaped set (`small`), with peak memory; the batched,
masked implementation against a plain per-dialogue loop over the same model and equations.

The per-dialogue loop is how the equations read when written straight down: each dialogue of a
batch through the model alone (its own length, no padding), its loss weighted by its share of
the batch's utterances, gradients summed, one optimiser step per batch of 16. Each measurement
runs in a fresh process, so peak memory is its own; CPU rows use every core this process may.
"""

from __future__ import annotations

import json
import time

import torch

from .common import emit_point, parser, peak_rss_mb, run_point, save, synthetic_dataset

COLUMNS = ["device", "implementation", "d", "batch", "threads", "epochs_timed", "ms_per_epoch", "ms_per_utterance",
           "speedup", "peak_mem_mb", "max_logit_diff"]


def train_epoch_per_dialogue(trainer) -> None:
    from cmath_model.model import cmath_loss

    model, cfg, split = trainer.model, trainer.config, trainer.data.splits["train"]
    model.train()
    order = torch.randperm(split.num_dialogues, generator=trainer.shuffle)
    for start in range(0, split.num_dialogues, cfg.batch_size):
        dialogues = order[start:start + cfg.batch_size]
        utterances = int(split.lengths[dialogues].sum())
        trainer.optimizer.zero_grad(set_to_none=True)
        for dialogue in dialogues:
            one = split.batch(dialogue.view(1), model.modalities).to(trainer.device)  # (1, L_i): no padding
            out = model(one.features, one.speaker, one.mask)
            loss = cmath_loss(out, one.label, one.mask, cfg, trainer.class_weight)["loss"]
            (loss * int(one.mask.sum()) / utterances).backward()
        trainer.optimizer.step()


def time_epochs(epoch, epochs: int, device: torch.device) -> tuple[float, float]:
    """Seconds per epoch over `epochs` timed epochs after one warm-up (allocator, kernels,
    first-touch memory), and peak memory in MiB (process RSS on CPU, allocated on GPU)."""
    epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(epochs):
        epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / epochs
    memory = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()
    return seconds, memory


@torch.no_grad()
def max_logit_difference(trainer) -> float:
    """Batched and one-at-a-time logits of the same dialogues (eval mode): padding must change nothing."""
    model, split = trainer.model, trainer.data.splits["valid"]
    model.eval()
    dialogues = torch.arange(min(16, split.num_dialogues))
    batch = split.batch(dialogues, model.modalities).to(trainer.device)
    batched = model(batch.features, batch.speaker, batch.mask).logits_x.split(batch.mask.sum(1).tolist())
    worst = 0.0
    for i in dialogues:
        one = split.batch(i.view(1), model.modalities).to(trainer.device)
        alone = model(one.features, one.speaker, one.mask).logits_x
        worst = max(worst, float((batched[i] - alone).abs().max()))
    return worst


def measure(point: dict) -> dict:
    from cmath_model.config import paper_defaults
    from cmath_model.data import load_dataset
    from cmath_model.train import Trainer

    device = torch.device(point["device"])
    data = load_dataset(point["data"])
    config = paper_defaults("iemocap").replace(d=point["d"], batch_size=point["batch"], lr=3e-4,
                                               num_threads=point.get("threads", 0), device=point["device"])
    trainer = Trainer(config, data, device=device)
    epoch = trainer.train_epoch if point["implementation"] == "batched" else lambda: train_epoch_per_dialogue(trainer)
    seconds, memory = time_epochs(epoch, point["epochs"], device)
    utterances = data.splits["train"].num_utterances
    return dict(device=point["device"], implementation=point["implementation"], d=point["d"], batch=point["batch"],
                threads=torch.get_num_threads() if device.type == "cpu" else None, epochs_timed=point["epochs"],
                ms_per_epoch=1000 * seconds, ms_per_utterance=1000 * seconds / utterances, utterances=utterances,
                dialogues=data.splits["train"].num_dialogues, peak_mem_mb=memory,
                max_logit_diff=max_logit_difference(trainer) if point["implementation"] == "batched" else None)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--devices", nargs="+", help="default: cpu, and cuda when a GPU is visible")
    p.add_argument("--epochs", type=int, help="timed epochs per measurement (default 3; quick 1)")
    args = p.parse_args(argv)
    if args.point:
        emit_point(measure(json.loads(args.point)))
        return
    data = synthetic_dataset(args.data_dir, "tiny" if args.quick else "small")
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    d = 64 if args.quick else 500
    rows = []
    for device in devices:
        per_device = []
        for implementation in ("batched", "per_dialogue"):
            point = dict(data=str(data), device=device, implementation=implementation, d=d, batch=16,
                         epochs=args.epochs or (1 if args.quick else 3))
            print(f"speed: {device} {implementation} d={d}", flush=True)
            per_device.append(run_point("speed", point))
        batched, loop = per_device
        batched["speedup"] = loop["ms_per_epoch"] / batched["ms_per_epoch"]
        rows += per_device
    save("speed", args, rows, COLUMNS, data=str(data),
         notes="ms_per_epoch: one training pass (forward, loss, backward, Adam) over the train split, mean of the "
               "timed epochs after one warm-up epoch; speedup: per-dialogue loop time / batched time; peak_mem_mb: "
               "process peak RSS on CPU, torch.cuda.max_memory_allocated on GPU; max_logit_diff: batched vs "
               "one-dialogue-at-a-time logits in eval mode")


if __name__ == "__main__":
    main()
