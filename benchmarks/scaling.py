"""Figure 6, scaling with work: CMATH's training epoch time and peak memory as dialogues grow
(IEMOCAP-like, 50 -> 110 utterances each, at d 500) and as d grows (100 -> 600, at 50 utterances).

Every dialogue has exactly the given length (random features of IEMOCAP's widths: the content
does not change the work), 32 training dialogues, batch 16; each point runs in a fresh process.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from .common import emit_point, parser, run_point, save

COLUMNS = ["sweep", "device", "length", "d", "utterances", "ms_per_epoch", "ms_per_utterance", "peak_mem_mb"]
DIMS = {"text": 1024, "audio": 1582, "visual": 342}


def fixed_length_dataset(length: int, dialogues: int, seed: int = 0):
    from cmath_model.data import Dataset, Split

    rng = np.random.default_rng(seed)

    def split(count: int, offset: int) -> Split:
        n = count * length
        pad = {m: np.zeros((1, dim), np.float32) for m, dim in DIMS.items()}
        return Split(
            features={m: torch.from_numpy(np.concatenate([rng.standard_normal((n, dim), np.float32), pad[m]]))
                      for m, dim in DIMS.items()},
            speaker=torch.from_numpy(np.append(rng.integers(0, 2, n), 0)),
            label=torch.from_numpy(np.append(rng.integers(0, 6, n), -1)),
            index=torch.arange(n).view(count, length),
            lengths=torch.full((count,), length),
            dialogue_ids=[f"d{offset + i}" for i in range(count)])

    return Dataset(name="iemocap", classes=["hap", "sad", "neu", "ang", "exc", "fru"], modality_dims=dict(DIMS),
                   splits={"train": split(dialogues, 0), "valid": split(4, dialogues),
                           "test": split(4, dialogues + 4)},
                   path=f"<random, {length} utterances per dialogue>", sha256="", meta={})


def measure(point: dict) -> dict:
    from cmath_model.config import paper_defaults
    from cmath_model.train import Trainer

    from .speed import time_epochs

    device = torch.device(point["device"])
    data = fixed_length_dataset(point["length"], point["dialogues"])
    config = paper_defaults("iemocap").replace(d=point["d"], batch_size=16, lr=3e-4, device=point["device"])
    trainer = Trainer(config, data, device=device)
    seconds, memory = time_epochs(trainer.train_epoch, point["epochs"], device)
    utterances = data.splits["train"].num_utterances
    return dict(sweep=point["sweep"], device=point["device"], length=point["length"], d=point["d"],
                utterances=utterances, ms_per_epoch=1000 * seconds, ms_per_utterance=1000 * seconds / utterances,
                peak_mem_mb=memory)


def points(quick: bool, device: str) -> list[dict]:
    lengths, dims = ([50, 110], [100, 600]) if quick else ([50, 70, 90, 110], [100, 200, 300, 400, 500, 600])
    common = dict(device=device, dialogues=16 if quick else 32, epochs=1 if quick else 2)
    return ([dict(sweep="length", length=n, d=500, **common) for n in lengths]
            + [dict(sweep="d", length=50, d=d, **common) for d in dims])


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--devices", nargs="+", help="default: cpu, and cuda when a GPU is visible")
    args = p.parse_args(argv)
    if args.point:
        emit_point(measure(json.loads(args.point)))
        return
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for device in devices:
        for point in points(args.quick, device):
            print(f"scaling: {device} length {point['length']} d {point['d']}", flush=True)
            rows.append(run_point("scaling", point))
    save("scaling", args, rows, COLUMNS,
         notes="training pass only (forward, loss, backward, Adam) over 32 dialogues of exactly `length` "
               "utterances, batch 16; mean of 2 timed epochs after a warm-up; peak_mem_mb: process peak RSS on "
               "CPU, torch.cuda.max_memory_allocated on GPU")


if __name__ == "__main__":
    main()
