"""Epoch time, side by side: this checkout's training epoch against an older commit's, in one run.

Two workloads: IEMOCAP-size (synthetic `full`: 120 train+valid dialogues of ~48 utterances, three
modalities) with the IEMOCAP recipe (d 500, batch 16), and MELD's recipe on the real MELD
transcripts (text, MiniLM embeddings; synthetic MELD-size when ../shared is absent, said so).
Each measurement is a fresh process that imports `cmath_model` from one tree (the older commit
from a `git worktree` beside this one), builds the recipe's Trainer and times whole epochs
(`Trainer.step`: training, then scoring valid and test) after one warm-up epoch. Old and new
alternate, so drift on the machine lands on both; the figure is the ratio new / old.

`--profile` adds, per workload and tree, where one training epoch's time goes: by part (the
model's parts by equation, the losses, backward, Adam, the weight average, batching) and by
operator (torch.profiler). The parts are marked from outside the code (module hooks, wrappers),
so the older commit is profiled the same way.

`--wf1-seeds` adds MELD's recipe trained to the end on those seeds in both trees: validation
W-F1 and validation-selected test W-F1, mean and std, with Welch's t-test, so a change in
numerics is shown to leave the model's scores where they were.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import emit_point, meld_text_dataset, parser, run_point, save, synthetic_dataset, table

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "c36e0c1"  # the commit issue 30 measured: "half of c36e0c1's epoch time"
COLUMNS = ["workload", "code", "threads", "epochs_timed", "s_per_epoch", "train_s_per_epoch", "ratio",
           "train_ratio", "runs"]
PART_COLUMNS = ["part", "ms", "share"]
OP_COLUMNS = ["operator", "self_ms", "share", "calls"]


# ---------------------------------------------------------------- the trees
def worktree(commit: str) -> Path:
    """A checkout of `commit` beside this one (made once, reused), for importing its cmath_model."""
    path = ROOT.parent / f"{ROOT.name}-{commit}"
    if not (path / "cmath_model").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(path), commit],
                       check=True, capture_output=True, text=True)
    return path


def _import_tree(code: str) -> None:
    """Make `import cmath_model` load the tree at `code`, before anything imports it."""
    assert "cmath_model" not in sys.modules, "cmath_model was imported before the tree was chosen"
    sys.path.insert(0, code)
    import cmath_model

    loaded = Path(cmath_model.__file__).resolve().parents[1]
    if loaded != Path(code).resolve():
        raise RuntimeError(f"cmath_model came from {loaded}, not {code}")


# ---------------------------------------------------------------- one measurement (a fresh process)
def _trainer(point: dict):
    import dataclasses

    from cmath_model.config import recipe_defaults
    from cmath_model.data import load_dataset
    from cmath_model.train import Trainer

    data = load_dataset(point["data"])
    config = recipe_defaults(point["dataset"])
    known = {f.name for f in dataclasses.fields(config)}
    device = point.get("device", "cpu")
    changes = {k: v for k, v in {"num_threads": point["threads"], "device": device, "modalities": point["modalities"],
                                 "seed": point.get("seed", 0), **point.get("pin", {}), **point.get("set", {})}.items()
               if k in known}
    return Trainer(config.replace(**changes), data, device=device)


def measure_time(point: dict) -> dict:
    """Seconds per whole epoch and per training pass, mean of point["epochs"] after a warm-up one."""
    trainer = _trainer(point)
    trainer.step()  # warm-up: allocator, first-touch memory, lazy initialisation; with compile, compiling
    records = [trainer.step() for _ in range(point["epochs"])]
    return dict(s_per_epoch=statistics.mean(r["epoch_seconds"] for r in records),
                train_s_per_epoch=statistics.mean(r["train_seconds"] for r in records))


def measure_wf1(point: dict) -> dict:
    trainer = _trainer(point)
    while trainer.epoch < trainer.config.epochs:
        trainer.step()
    return dict(val_wf1=trainer.best["val_wf1"], test_wf1=trainer.best["test_wf1"], best_epoch=trainer.best["epoch"])


def measure_profile(point: dict) -> dict:
    """One profiled training epoch after a warm-up one: time by part and by operator."""
    from torch.profiler import ProfilerActivity, profile

    trainer = _trainer(point)
    train_epoch = getattr(trainer, "train_epoch", None) or trainer._train_epoch  # its name at c36e0c1
    train_epoch()
    marked = _mark_parts(trainer)
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_epoch()
    wall_ms = 1000 * (time.perf_counter() - started)
    events = prof.events()
    parts: dict[str, float] = {}
    for event in events:
        if event.name in marked:
            parts[event.name] = parts.get(event.name, 0.0) + event.cpu_time_total / 1000
    top_level = sum(ms for name, ms in parts.items() if not name.startswith("  "))
    parts["other (Python, metrics, loop)"] = wall_ms - top_level
    operators = sorted((e for e in prof.key_averages() if e.key not in marked),
                       key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [dict(operator=e.key, self_ms=e.self_cpu_time_total / 1000, calls=e.count) for e in operators[:14]]
    return dict(wall_ms=wall_ms, parts=parts, ops=ops, order=list(marked))


def _mark_parts(trainer) -> list[str]:
    """Profiler ranges around the model's parts (module hooks) and the step's parts (wrappers).
    Names indented by two spaces are inside the forward pass; the rest tile the epoch."""
    import importlib

    import torch
    from torch.autograd.profiler import record_function

    # By import_module: `cmath_model.train` as an attribute can be the package's `train` function.
    data_module, train_module = (importlib.import_module(f"cmath_model.{m}") for m in ("data", "train"))

    model, open_ranges = trainer.model, []

    def hook(module, name: str) -> None:
        def enter(*_):
            rf = record_function(name)
            rf.__enter__()
            open_ranges.append(rf)

        def leave(*_):
            open_ranges.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)

    layers = [layer for cma in model.cma.values() for layer in cma.layers]
    model_parts = {
        "  input projection and reconstruction (Eq. 1-4)": list(model.reconstruction.values()),
        "  speaker + position (Eq. 5-8)": [model.embedding],
        "  CMA cross-modal streams (Eq. 9-10)": [stream for layer in layers for stream in layer.aux],
        "  CMA central streams (Eq. 11)": [layer.central for layer in layers],
        "  gates (Eq. 12)": [layer.gate for layer in layers if layer.gate is not None],
        "  variational fusion (Eq. 15-17)": [model.fusion],
        "  classifier heads (Eq. 19)": [*model.heads.values(), model.head_x],
    }
    for name, modules in model_parts.items():
        for module in modules:
            hook(module, name)
    hook(model, "forward")

    def wrap(owner, attribute: str, name: str, generator: bool = False) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            with record_function(name):
                return original(*args, **kwargs)

        def timed_generator(*args, **kwargs):
            iterator = original(*args, **kwargs)
            while True:
                with record_function(name):
                    try:
                        item = next(iterator)
                    except StopIteration:
                        return
                yield item

        setattr(owner, attribute, timed_generator if generator else timed)

    wrap(data_module.Split, "batches", "batching (gather, pad)", generator=True)
    wrap(data_module.Batch, "to", "batching (gather, pad)")
    wrap(train_module, "cmath_loss", "losses (Eq. 18-24)")
    wrap(torch.Tensor, "backward", "backward")
    wrap(trainer.optimizer, "step", "optimiser (Adam)")
    if getattr(trainer, "average", None) is not None:
        wrap(trainer.average, "update", "weight average")
    return [*model_parts, "forward", "losses (Eq. 18-24)", "backward", "optimiser (Adam)", "weight average",
            "batching (gather, pad)"]


# ---------------------------------------------------------------- the run
# The MELD recipe as c36e0c1 had it, set in both trees: issue 31 dropped these from the recipe on
# validation (a modelling decision, 2026-12-07), and a lighter config is not a faster epoch.
C36E0C1_MELD = {"input_dropout": 0.2, "modality_head": "sdt", "weight_decay": 1.0e-5}


def workloads(args) -> list[dict]:
    """The two recipes to time, as points: IEMOCAP-size (synthetic) and MELD (the real transcripts
    where ../shared has them; synthetic MELD-size otherwise, and in --quick runs)."""
    iemocap = synthetic_dataset(args.data_dir, "tiny" if args.quick else "full")
    try:
        if args.quick:
            raise FileNotFoundError
        meld, meld_note = meld_text_dataset(args.data_dir), "real MELD transcripts, text"
    except FileNotFoundError:
        meld, meld_note = synthetic_dataset(args.data_dir, "tiny" if args.quick else "full", "meld"), \
            "synthetic MELD-size, text"
    return [dict(workload="IEMOCAP-size, recipe (d 500, batch 16, tav)", dataset="iemocap", data=str(iemocap),
                 modalities="tav", note=f"synthetic IEMOCAP {'tiny' if args.quick else 'full'}"),
            dict(workload="MELD recipe (d 400, batch 4, text)", dataset="meld", data=str(meld), modalities="t",
                 note=meld_note, pin=C36E0C1_MELD)]


def _run(kind: str, point: dict) -> dict:
    # Each tree imports its own cmath_model (point["code"]); the benchmarks package always comes from this checkout.
    return run_point("epoch", {**point, "kind": kind}, timeout=7200,
                     env={"PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--against", default=BASELINE, help=f"the older commit (default {BASELINE})")
    p.add_argument("--threads", type=int, nargs="+", default=[1],
                   help="torch threads per measurement (default 1: what a trial with --cpus-per-trial 1 uses)")
    p.add_argument("--epochs", type=int, help="timed epochs per measurement (default 2; quick 1)")
    p.add_argument("--repeats", type=int, default=2, help="measurements per tree, alternating (default 2)")
    p.add_argument("--profile", action="store_true", help="also profile one training epoch per workload and tree")
    p.add_argument("--wf1-seeds", type=int, nargs="*", default=[],
                   help="train MELD's recipe to the end on these seeds in both trees and compare W-F1")
    p.add_argument("--only", choices=["iemocap", "meld"], help="one workload")
    p.add_argument("--extra", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="also time this checkout with these config fields set (e.g. precision=bf16), as one more row")
    args = p.parse_args(argv)
    if args.point:
        point = json.loads(args.point)
        _import_tree(point["code"])
        emit_point({"time": measure_time, "wf1": measure_wf1, "profile": measure_profile}[point["kind"]](point))
        return
    trees = {"old": str(worktree(args.against)), "new": str(ROOT)}
    extra = dict(item.split("=", 1) for item in args.extra)
    codes = ("old", "new", "new+") if extra else ("old", "new")
    chosen = [w for w in workloads(args) if args.only in (None, w["dataset"])]
    epochs = args.epochs or (1 if args.quick else 2)
    rows, profiles, wf1 = [], {}, {}
    for workload in chosen:
        for threads in args.threads:
            runs = {code: [] for code in codes}
            for repeat in range(args.repeats):
                for code in codes if repeat % 2 == 0 else codes[::-1]:
                    print(f"epoch: {workload['workload']}, {threads} thread(s), {code} ({repeat + 1}/{args.repeats})",
                          flush=True)
                    runs[code].append(_run("time", {**workload, "code": trees[code.rstrip("+")], "threads": threads,
                                                    "epochs": epochs, "set": extra if code == "new+" else {}}))
            summary = {code: {key: statistics.median(r[key] for r in runs[code])
                              for key in ("s_per_epoch", "train_s_per_epoch")} for code in runs}
            names = {"old": f"old ({args.against})", "new": "new (this checkout)",
                     "new+": "new + " + " ".join(args.extra)}
            for code in codes:
                rows.append(dict(workload=workload["workload"], code=names[code],
                                 threads=threads, epochs_timed=epochs, runs=args.repeats, **summary[code],
                                 ratio=summary[code]["s_per_epoch"] / summary["old"]["s_per_epoch"],
                                 train_ratio=summary[code]["train_s_per_epoch"] / summary["old"]["train_s_per_epoch"]))
        if args.profile:
            for code in ("old", "new"):
                print(f"epoch: profiling {workload['workload']}, {code}", flush=True)
                profiles[f"{workload['workload']} / {code}"] = _run(
                    "profile", {**workload, "code": trees[code], "threads": args.threads[0]})
    if args.wf1_seeds:
        meld = next(w for w in workloads(args) if w["dataset"] == "meld")
        for code in ("old", "new"):
            wf1[code] = []
            for seed in args.wf1_seeds:
                print(f"epoch: MELD recipe seed {seed}, {code}", flush=True)
                wf1[code].append({"seed": seed, **_run("wf1", {**meld, "code": trees[code], "threads": args.threads[0],
                                                               "seed": seed})})
    for name, prof in profiles.items():
        print(f"\n{name}: one profiled training epoch, {prof['wall_ms']:.0f} ms")
        print(table(part_rows(prof), PART_COLUMNS))
        print(table([{**op, "share": op["self_ms"] / prof["wall_ms"]} for op in prof["ops"]], OP_COLUMNS))
    comparison = compare_wf1(wf1) if wf1 else None
    if comparison:
        print("\nMELD recipe, validation-selected scores (%):")
        print(table(comparison["rows"], ["code", "seeds", "val_wf1", "val_std", "test_wf1", "test_std"]))
        print(f"test W-F1 new - old: {comparison['test_diff']:+.2f} (Welch p {comparison['test_p']:.2f}); "
              f"validation: {comparison['val_diff']:+.2f} (p {comparison['val_p']:.2f})")
    print()
    save("epoch", args, rows, COLUMNS, against=args.against, workloads=chosen, profiles=profiles, wf1=wf1,
         wf1_comparison=comparison,
         notes="s_per_epoch: Trainer.step (train, then score valid and test), median over runs of the mean of the "
               "timed epochs after one warm-up; train_s_per_epoch: the training pass alone; ratio: this tree / old")


def part_rows(prof: dict) -> list[dict]:
    """The profile's parts in a fixed order, each with its share of the profiled epoch."""
    order = [*prof["order"], "other (Python, metrics, loop)"]
    return [dict(part=name, ms=prof["parts"][name], share=prof["parts"][name] / prof["wall_ms"])
            for name in order if name in prof["parts"]]


def compare_wf1(wf1: dict) -> dict:
    """Mean and std (in %) of each tree's seeds, and Welch's t-test of new against old."""
    from scipy import stats

    rows, values = [], {}
    for code, runs in wf1.items():
        val, test = [100 * r["val_wf1"] for r in runs], [100 * r["test_wf1"] for r in runs]
        values[code] = (val, test)
        rows.append(dict(code=code, seeds=" ".join(str(r["seed"]) for r in runs), val_wf1=statistics.mean(val),
                         val_std=statistics.stdev(val) if len(val) > 1 else None, test_wf1=statistics.mean(test),
                         test_std=statistics.stdev(test) if len(test) > 1 else None))
    (old_val, old_test), (new_val, new_test) = values["old"], values["new"]
    return dict(rows=rows, test_diff=statistics.mean(new_test) - statistics.mean(old_test),
                val_diff=statistics.mean(new_val) - statistics.mean(old_val),
                test_p=float(stats.ttest_ind(new_test, old_test, equal_var=False).pvalue),
                val_p=float(stats.ttest_ind(new_val, old_val, equal_var=False).pvalue))


if __name__ == "__main__":
    main()
