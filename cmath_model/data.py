"""The canonical dataset: one Parquet file, one row per utterance, metadata in the schema.

Columns: dialogue_id (string), position (int32, 0-based order in the dialogue), speaker
(int32, index within the dialogue), label (int32), split (train/valid/test) and one
fixed_size_list<float32> column per modality present (text, audio, visual).
Schema metadata key ``cmath`` holds JSON: dataset, classes, modality_dims, source,
source_sha256, split_seed.

In memory a split is a flat (N, D) tensor per modality plus per-dialogue index rows, so a
batch is one gather into padded (B, L, D) tensors with a (B, L) mask: no Python loop per
utterance, and the whole object pickles cheaply into Ray's object store.

`inspect_dataset` runs every check of `load_dataset` and returns what planning needs
(`DatasetInfo`) without building tensors: this module imports torch only where it makes them,
so a sweep's plan and dry run need no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import MODALITIES, MODALITY_LETTERS, CMATHConfig, file_sha256
from .errors import DataError, closest

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "valid", "test")
METADATA_KEY = b"cmath"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------- writing
@dataclass
class Utterances:
    """Column arrays of a dataset before it is written; the one shape every importer builds."""

    dialogue_id: np.ndarray  # (N,) str
    position: np.ndarray  # (N,) int
    speaker: np.ndarray  # (N,) int
    label: np.ndarray  # (N,) int
    split: np.ndarray  # (N,) str
    features: dict[str, np.ndarray]  # modality -> (N, D) float32


def write_dataset(
    path: str | Path,
    utts: Utterances,
    *,
    dataset: str,
    classes: list[str],
    source: str,
    source_sha256: str,
    split_seed: int | None,
) -> Path:
    """Validate and write the canonical Parquet file (atomically: a crash leaves no half file)."""
    path = Path(path)
    n = len(utts.label)
    features = {m: np.ascontiguousarray(x, dtype=np.float32) for m, x in utts.features.items()}
    _check_arrays(str(path), utts, features, len(classes))
    columns = {
        "dialogue_id": pa.array(utts.dialogue_id.astype(str), pa.string()),
        "position": pa.array(utts.position, pa.int32()),
        "speaker": pa.array(utts.speaker, pa.int32()),
        "label": pa.array(utts.label, pa.int32()),
        "split": pa.array(utts.split.astype(str), pa.string()),
    }
    for m in MODALITIES:
        if m in features:
            x = features[m]
            columns[m] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    meta = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "classes": list(classes),
        "modality_dims": {m: int(features[m].shape[1]) for m in MODALITIES if m in features},
        "source": source,
        "source_sha256": source_sha256,
        "split_seed": split_seed,
        "num_utterances": n,
    }
    table = pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def _check_arrays(name: str, utts: Utterances, features: dict[str, np.ndarray], n_classes: int) -> None:
    n = len(utts.label)
    if n == 0:
        raise DataError(f"{name}: no utterances to write")
    if not features:
        raise DataError(f"{name}: no modality features (need at least one of {', '.join(MODALITIES)})")
    for m, x in features.items():
        if m not in MODALITIES:
            raise DataError(f"{name}: unknown modality '{m}' (known: {', '.join(MODALITIES)})")
        if x.ndim != 2 or x.shape[0] != n:
            raise DataError(f"{name}: {m} features have shape {x.shape}, expected ({n}, D)")
        _check_finite(name, m, x)
    labels = np.asarray(utts.label)
    if labels.min() < 0 or labels.max() >= n_classes:
        bad = labels[(labels < 0) | (labels >= n_classes)][0]
        raise DataError(f"{name}: label {bad} is outside the {n_classes} classes; fix the label map")
    unknown = set(np.unique(utts.split.astype(str))) - set(SPLITS)
    if unknown:
        raise DataError(f"{name}: unknown split '{sorted(unknown)[0]}' (use train, valid, test)")


def _check_finite(name: str, modality: str, x: np.ndarray) -> None:
    finite = np.isfinite(x)
    if not finite.all():
        row = int(np.argwhere(~finite)[0, 0])
        raise DataError(f"{name}: {modality} features contain NaN/inf (first at row {row}); "
                        "clean or re-extract them")


def split_dialogues(dialogue_ids: list[str], fraction: float, seed: int) -> set[str]:
    """The paper's protocol: a seeded random `fraction` of the training dialogues validates."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"validation fraction {fraction} must be between 0 and 1")
    ids = sorted(set(dialogue_ids))
    rng = np.random.default_rng(seed)
    n_valid = max(1, int(round(fraction * len(ids))))
    if n_valid >= len(ids):
        raise DataError(f"only {len(ids)} training dialogues: too few to hold out {fraction:.0%} for validation")
    return set(rng.choice(ids, size=n_valid, replace=False).tolist())


# ---------------------------------------------------------------------------- reading
@dataclass
class Split:
    """One split in memory: flat features plus each dialogue's utterance rows."""

    features: dict[str, torch.Tensor]  # modality -> (N + 1, D); the last row is zeros (padding)
    speaker: torch.Tensor  # (N + 1,) long
    label: torch.Tensor  # (N + 1,) long; padding row -1
    index: torch.Tensor  # (n_dialogues, L_max) long rows into the flat tensors; N marks padding
    lengths: torch.Tensor  # (n_dialogues,)
    dialogue_ids: list[str]

    @property
    def num_dialogues(self) -> int:
        return len(self.dialogue_ids)

    @property
    def num_utterances(self) -> int:
        return int(self.lengths.sum())

    def _rows(self, dialogues: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) rows into the flat tensors for the given dialogues, trimmed to the longest of
        them, and the (B, L) mask of real utterances (the last flat row is the padding row)."""
        rows = self.index[dialogues, :int(self.lengths[dialogues].max())]
        return rows, rows < self.label.shape[0] - 1

    def batch(self, dialogues: torch.Tensor, modalities: tuple[str, ...]) -> Batch:
        """Padded tensors for the given dialogue indices, trimmed to the longest of them."""
        rows, mask = self._rows(dialogues)
        return Batch(
            features={m: self.features[m][rows] for m in modalities},  # (B, L, D_m)
            speaker=self.speaker[rows],
            label=self.label[rows],
            mask=mask,
            dialogues=dialogues,
        )

    def packed_batch(self, dialogues: torch.Tensor, modalities: tuple[str, ...]) -> PackedBatch:
        """The given dialogues' real utterances in a row (what the model computes on), with the
        (B, L) mask and speakers attention and positions need; no padding row is gathered."""
        rows, mask = self._rows(dialogues)
        flat_mask = mask.reshape(-1)
        real = rows.reshape(-1)[flat_mask]  # (N,) rows into the flat tensors
        return PackedBatch(
            features={m: self.features[m].index_select(0, real) for m in modalities},  # (N, D_m)
            speaker=self.speaker[rows],
            label=self.label.index_select(0, real),
            mask=mask,
            positions=flat_mask.nonzero().squeeze(1),
            dialogues=dialogues,
        )

    def batches(self, batch_size: int, modalities: tuple[str, ...], generator: torch.Generator | None = None,
                packed: bool = False) -> Iterator[Batch | PackedBatch]:
        """Batches of `batch_size` dialogues, shuffled by `generator` (in order without one);
        padded `Batch`es, or `PackedBatch`es with `packed`."""
        import torch

        order = (torch.randperm(self.num_dialogues, generator=generator) if generator is not None
                 else torch.arange(self.num_dialogues))
        make = self.packed_batch if packed else self.batch
        for start in range(0, self.num_dialogues, batch_size):
            yield make(order[start:start + batch_size], modalities)


@dataclass
class Batch:
    features: dict[str, torch.Tensor]  # modality -> (B, L, D_m), zeros at padding
    speaker: torch.Tensor  # (B, L)
    label: torch.Tensor  # (B, L), -1 at padding
    mask: torch.Tensor  # (B, L) bool, True for real utterances
    dialogues: torch.Tensor  # (B,) dialogue indices within the split

    def to(self, device: torch.device) -> Batch:
        return Batch({m: x.to(device) for m, x in self.features.items()}, self.speaker.to(device),
                     self.label.to(device), self.mask.to(device), self.dialogues)


@dataclass
class PackedBatch:
    features: dict[str, torch.Tensor]  # modality -> (N, D_m), the N real utterances in (dialogue, turn) order
    speaker: torch.Tensor  # (B, L)
    label: torch.Tensor  # (N,)
    mask: torch.Tensor  # (B, L) bool, True for real utterances
    positions: torch.Tensor  # (N,) flat indices of the real utterances in the (B, L) layout
    dialogues: torch.Tensor  # (B,) dialogue indices within the split

    @property
    def num_utterances(self) -> int:
        return self.label.shape[0]

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch({m: x.to(device, non_blocking=True) for m, x in self.features.items()},
                           self.speaker.to(device), self.label.to(device), self.mask.to(device),
                           self.positions.to(device), self.dialogues)


@dataclass(frozen=True)
class DatasetInfo:
    """A checked dataset file without its tensors: what a sweep's plan records and checks."""

    name: str
    classes: list[str]
    modality_dims: dict[str, int]
    path: str
    sha256: str
    meta: dict
    sizes: dict[str, tuple[int, int]]  # split -> (dialogues, utterances)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def require_modalities(self, modalities: tuple[str, ...]) -> None:
        missing = [m for m in modalities if m not in self.modality_dims]
        if missing:
            have = "".join(m[0] for m in self.modality_dims)
            raise DataError(f"{self.path}: the run needs the {missing[0]} modality but the file has only "
                            f"{', '.join(self.modality_dims)}; set modalities: {have} or use a file with {missing[0]}")


@dataclass
class Dataset:
    name: str
    classes: list[str]
    modality_dims: dict[str, int]
    splits: dict[str, Split]
    path: str
    sha256: str
    meta: dict

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo(name=self.name, classes=self.classes, modality_dims=self.modality_dims, path=self.path,
                           sha256=self.sha256, meta=self.meta,
                           sizes={k: (s.num_dialogues, s.num_utterances) for k, s in self.splits.items()})

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def max_speakers(self) -> int:
        return int(max(s.speaker[:-1].max() for s in self.splits.values())) + 1

    def require_modalities(self, modalities: tuple[str, ...]) -> None:
        self.info.require_modalities(modalities)

    def feature_stats(self, modalities: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-dimension (mean, std) of each modality over the training utterances only, so
        validation and test never inform the model."""
        train = self.splits["train"]
        return {m: (train.features[m][:-1].mean(0), train.features[m][:-1].std(0)) for m in modalities}

    def class_frequencies(self) -> np.ndarray:
        """Label frequencies over the training split. SDT counts train + valid; that lets
        validation labels reach the training loss, and validation is what selects epochs and
        trials, so only the training split counts here."""
        labels = self.splits["train"].label[:-1].numpy()
        counts = np.bincount(labels, minlength=self.num_classes).astype(np.float64)
        return counts / counts.sum()


def _nearest_file(path: Path) -> str:
    """" (did you mean data/meld.parquet?)" for a near miss of a file or folder that exists."""
    folder = path.parent
    if not folder.is_dir():
        above = folder.parent
        match = closest(folder.name, [p.name for p in above.iterdir() if p.is_dir()]) if above.is_dir() else None
        return f" (no folder {folder}; did you mean {above / match}?)" if match else f" (no folder {folder})"
    match = closest(path.name, [p.name for p in folder.iterdir() if p.is_file() and p.suffix == ".parquet"])
    return f" (did you mean {folder / match}?)" if match else ""


def load_dataset(path: str | Path, expected_sha256: str | None = None) -> Dataset:
    """Read and check a canonical Parquet dataset. Every problem is one DataError line.

    Args:
        path: the Parquet file.
        expected_sha256: refuse a file whose SHA-256 differs (a config pinned to its data).

    Returns:
        The dataset with each split's tensors.
    """
    path, sha, table, meta = _read(path, expected_sha256)
    info, arrays = _check(path, sha, table, meta)
    return Dataset(name=info.name, classes=info.classes, modality_dims=info.modality_dims,
                   splits={name: _build_split(*parts) for name, parts in arrays.items()},
                   path=info.path, sha256=info.sha256, meta=info.meta)


def inspect_dataset(path: str | Path, expected_sha256: str | None = None) -> DatasetInfo:
    """Every check of `load_dataset` (the same DataError lines), without building tensors.

    Args:
        path: the Parquet file.
        expected_sha256: refuse a file whose SHA-256 differs.

    Returns:
        The file's name, classes, modalities, hash and split sizes.
    """
    return _check(*_read(path, expected_sha256))[0]


def _read(path: str | Path, expected_sha256: str | None) -> tuple[Path, str, pa.Table, dict]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such dataset file{_nearest_file(path)}; make one from transcripts "
                        f"(`cmath-data from-csv`), a feature pickle (`cmath-data import`) or synthetic data "
                        f"(`cmath-data synth iemocap -o {path}`)")
    sha = file_sha256(path)
    if expected_sha256 and sha != expected_sha256:
        raise DataError(f"{path}: SHA-256 {sha[:12]}… differs from the config's data_sha256 "
                        f"{expected_sha256[:12]}…; the file changed since the config was made: "
                        "point the config at the original file or clear data_sha256")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]}); "
                        "it may be truncated: regenerate it with cmath-data") from None
    return path, sha, table, _read_meta(path, table)


def pin_data(config: CMATHConfig, data: DatasetInfo | Dataset, fit_modalities: bool = False) -> CMATHConfig:
    """The config pinned to a checked data file: its absolute path and SHA-256.

    Args:
        config: the run's config.
        data: the file, as `inspect_dataset` or `load_dataset` read it.
        fit_modalities: narrow modalities the file lacks to those it has (a text-only file runs
            the text-only model) instead of refusing them.

    Returns:
        The pinned config; DataError if it needs a modality the file does not have.
    """
    changes: dict = {"data": str(Path(data.path).resolve()), "data_sha256": data.sha256}
    if fit_modalities:
        have = "".join(c for c in config.modalities if MODALITY_LETTERS[c] in data.modality_dims)
        changes["modalities"] = have or config.modalities
    config = config.replace(**changes)
    data.require_modalities(config.modality_names)
    return config


def dataset_name(path: str | Path) -> str | None:
    """The dataset name from the schema metadata alone (no data read); None if unreadable,
    leaving the full load to report what is wrong."""
    try:
        return json.loads(pq.read_schema(path).metadata[METADATA_KEY]).get("dataset")
    except (OSError, pa.ArrowInvalid, KeyError, TypeError, json.JSONDecodeError):
        return None


def _read_meta(path: Path, table: pa.Table) -> dict:
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise DataError(f"{path}: no cmath metadata in the Parquet schema; write it with cmath-data")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise DataError(f"{path}: cmath metadata is not valid JSON; regenerate the file with cmath-data") from None
    for key in ("dataset", "classes", "modality_dims"):
        if key not in meta:
            raise DataError(f"{path}: cmath metadata lacks '{key}'; regenerate the file with cmath-data")
    return meta


def _check(path: Path, sha: str, table: pa.Table, meta: dict) -> tuple[DatasetInfo, dict[str, tuple]]:
    """The file's info, and per split the arrays `_build_split` turns into tensors."""
    required = ["dialogue_id", "position", "speaker", "label", "split"]
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column '{missing[0]}' (needs {', '.join(required)})")
    dims = {m: int(meta["modality_dims"][m]) for m in MODALITIES if m in meta["modality_dims"]}
    if not dims:
        raise DataError(f"{path}: metadata lists no modality; regenerate the file with cmath-data")
    classes = list(meta["classes"])

    columns = {c: table.column(c).to_numpy() for c in required}
    features = {}
    for m, dim in dims.items():
        if m not in table.column_names:
            raise DataError(f"{path}: metadata lists modality '{m}' but the column is missing")
        column = table.column(m).combine_chunks()
        if not pa.types.is_fixed_size_list(column.type) or column.type.list_size != dim:
            raise DataError(f"{path}: column '{m}' holds vectors of type {column.type}, "
                            f"expected fixed_size_list<float32>[{dim}] as the metadata says")
        x = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
        _check_finite(str(path), m, x)
        features[m] = x

    labels = columns["label"].astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        bad = labels[(labels < 0) | (labels >= len(classes))][0]
        raise DataError(f"{path}: label {bad} is outside the {len(classes)} classes {classes}")

    arrays = {}
    split_col = columns["split"].astype(str)
    for name in SPLITS:
        rows = np.flatnonzero(split_col == name)
        if len(rows) == 0:
            raise DataError(f"{path}: the {name} split is empty; re-import with a validation fraction "
                            "(--resplit 0.2) or check the split column")
        arrays[name] = (*_order_split(path, rows, columns), columns, features)
    sizes = {name: (len(parts[1]), len(parts[0])) for name, parts in arrays.items()}
    info = DatasetInfo(name=meta["dataset"], classes=classes, modality_dims=dims, path=str(path), sha256=sha,
                       meta=meta, sizes=sizes)
    return info, arrays


def _order_split(path: Path, rows: np.ndarray, columns: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                       np.ndarray, np.ndarray]:
    """A split's rows in dialogue order, its dialogue ids, lengths, and each row's (dialogue, position)."""
    dialogue = columns["dialogue_id"][rows].astype(str)
    position = columns["position"][rows].astype(np.int64)
    # Sort by (dialogue order of first appearance, position) so each dialogue is contiguous.
    ids, first = np.unique(dialogue, return_index=True)
    ids = ids[np.argsort(first)]
    dialogue_rank = {d: i for i, d in enumerate(ids)}
    rank = np.fromiter((dialogue_rank[d] for d in dialogue), dtype=np.int64, count=len(dialogue))
    order = np.lexsort((position, rank))
    rows, rank, position = rows[order], rank[order], position[order]

    lengths = np.bincount(rank, minlength=len(ids))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    offset = np.arange(len(rows)) - starts[rank]
    if not np.array_equal(offset, position):
        bad = ids[rank[np.flatnonzero(offset != position)[0]]]
        raise DataError(f"{path}: dialogue '{bad}' has positions that are not 0..n-1 without gaps or repeats")
    return rows, ids, lengths, rank, offset


def _build_split(rows: np.ndarray, ids: np.ndarray, lengths: np.ndarray, rank: np.ndarray, offset: np.ndarray,
                 columns: dict, features: dict) -> Split:
    import torch

    n = len(rows)
    index = np.full((len(ids), int(lengths.max())), n, dtype=np.int64)
    index[rank, offset] = np.arange(n)

    def flat(values: np.ndarray, pad: float) -> torch.Tensor:
        padded = np.concatenate([values, np.full((1,) + values.shape[1:], pad, dtype=values.dtype)])
        return torch.from_numpy(padded)

    return Split(
        features={m: flat(x[rows], 0.0) for m, x in features.items()},
        speaker=flat(columns["speaker"][rows].astype(np.int64), 0),
        label=flat(columns["label"][rows].astype(np.int64), -1),
        index=torch.from_numpy(index),
        lengths=torch.from_numpy(lengths),
        dialogue_ids=ids.tolist(),
    )
