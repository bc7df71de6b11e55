"""The sweep's own records on the shared storage, so that another host can resume the sweep.

The sweep's folder (`--results/<name>`) is on the driver's disk. With a shared `--storage`, what
a resume needs of it is mirrored to `<storage>/<name>/cmath_sweep/` each time Tune saves its
experiment and when the sweep ends: sweep.json, trials.parquet (and at the end history.parquet
and the MLflow failures), and the journal (history.jsonl) as numbered segments, each holding the
lines added since the mirror before (an object store cannot append). `cmath-hpo resume
<storage>/<name>` on another host rebuilds the sweep's folder from it (`restore_sweep_folder`).

The mirror is as old as Tune's own saved state, which is what a resume restores. Results that
arrived after it are either in the checkpoint a trial resumes from, whose history the trial
brings back (hpo.table), or trained again; ended trials' records are written at once beside it
(hpo.recovery), and the study has its own place (hpo.study).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.fs as pafs

from cmath_model.errors import command

from .errors import SweepError
from .record import FAILURES_FILE, SWEEP_FILE
from .storage import is_uri, join
from .trials import HISTORY_FILE, JOURNAL_FILE, TRIALS_FILE

logger = logging.getLogger("hpo")

MIRROR_FOLDER = "cmath_sweep"  # in the experiment's storage folder, beside Ray's trial folders
MIRRORED = (SWEEP_FILE, TRIALS_FILE)  # at every mirror, when they changed
MIRRORED_AT_END = (HISTORY_FILE, FAILURES_FILE)  # derived from the journal, or written once at the end
JOURNAL_FOLDER = "journal"  # in the mirror: <byte offset, 15 digits>.jsonl


def is_mirror(location: str) -> bool:
    """Whether a folder or URI holds a sweep's mirror (`<storage>/<name>`, or its cmath_sweep/)."""
    return _mirror_root(location) is not None


class SweepMirror:
    """Copies the sweep's folder's records to `target` (a folder or URI on the shared storage),
    sending only what changed since the last copy."""

    def __init__(self, sweep_dir: Path, target: str):
        self.sweep_dir = Path(sweep_dir)
        self.target = target
        self._sent: dict[str, int] = {}  # file -> the mtime_ns of the copy sent
        self._journal_sent: int | None = None  # bytes of history.jsonl in the mirror; None: not read yet

    def sync(self, final: bool = False) -> None:
        """Send what changed (`final`: the end-of-sweep files too)."""
        fs, root = pafs.FileSystem.from_uri(self.target)
        for name in MIRRORED + (MIRRORED_AT_END if final else ()):
            path = self.sweep_dir / name
            if not path.exists() or path.stat().st_mtime_ns == self._sent.get(name):
                continue
            mtime = path.stat().st_mtime_ns
            _put(fs, f"{root}/{name}", path.read_bytes())
            self._sent[name] = mtime
        self._send_journal(fs, root)

    def _send_journal(self, fs: pafs.FileSystem, root: str) -> None:
        if self._journal_sent is None:
            self._journal_sent = sum(info.size for info in _journal_segments(fs, root))
        path = self.sweep_dir / JOURNAL_FILE
        if not path.exists():
            return
        with open(path, "rb") as journal:
            journal.seek(self._journal_sent)
            added = journal.read()
        added = added[:added.rfind(b"\n") + 1]  # whole lines only: one may be being written
        if added:
            _put(fs, f"{root}/{JOURNAL_FOLDER}/{self._journal_sent:015d}.jsonl", added)
            self._journal_sent += len(added)


def restore_sweep_folder(location: str, results: str | Path) -> Path:
    """Rebuild a sweep's folder under `results` from its mirror on the shared storage.

    Args:
        location: the sweep's folder on the storage (`<storage>/<name>`, or its cmath_sweep/).
        results: the folder to put the sweep's folder in (`results/<name>`).

    Returns:
        The sweep's folder; SweepError if `location` holds no mirror or `results` already holds
        another copy of the sweep.
    """
    root = _mirror_root(location)
    if root is None:
        raise SweepError(f"no sweep at {location} (looked for {MIRROR_HINT}); pass the sweep's folder on the shared "
                         f"storage, <--storage>/<name>")
    fs, path = root
    record = json.loads(_get(fs, f"{path}/{SWEEP_FILE}"))
    sweep_dir = Path(results) / record["name"]
    if (sweep_dir / SWEEP_FILE).exists():
        raise SweepError(f"{sweep_dir} already holds sweep '{record['name']}'; resume it with "
                         f"`{command('cmath-hpo')} resume {sweep_dir}`, or pass another --results to rebuild it "
                         f"from {location}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    for name in MIRRORED + MIRRORED_AT_END:
        if name != SWEEP_FILE and fs.get_file_info(f"{path}/{name}").type == pafs.FileType.File:
            (sweep_dir / name).write_bytes(_get(fs, f"{path}/{name}"))
    with open(sweep_dir / JOURNAL_FILE, "wb") as journal:
        for segment in _journal_segments(fs, path):
            journal.write(_get(fs, segment.path))
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(record, indent=1))  # last: the folder is whole once it is there
    return sweep_dir


MIRROR_HINT = f"{MIRROR_FOLDER}/{SWEEP_FILE}"


def storage_of(location: str) -> str:
    """The shared storage a sweep's folder on it (`<storage>/<name>`, or its cmath_sweep/) is in,
    with the location's query (`?endpoint_override=...`) kept."""
    base, sep, query = location.partition("?")
    base = base.rstrip("/").removesuffix(f"/{MIRROR_FOLDER}")
    return base.rsplit("/", 1)[0] + sep + query


def _mirror_root(location: str) -> tuple[pafs.FileSystem, str] | None:
    if not is_uri(location):
        location = str(Path(location).expanduser().resolve())
    try:
        for candidate in (join(location, MIRROR_FOLDER), location):
            fs, path = pafs.FileSystem.from_uri(candidate)
            path = path.rstrip("/")
            if fs.get_file_info(f"{path}/{SWEEP_FILE}").type == pafs.FileType.File:
                return fs, path
    except (OSError, ValueError):
        return None
    return None


def _journal_segments(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    """The journal's segments in order (names and sizes only); each must start where the one
    before ended."""
    found = sorted((info for info in fs.get_file_info(pafs.FileSelector(f"{root}/{JOURNAL_FOLDER}",
                                                                         allow_not_found=True))
                    if info.type == pafs.FileType.File and info.base_name.endswith(".jsonl")),
                   key=lambda info: info.base_name)
    offset = 0
    for info in found:
        if int(info.base_name.split(".", 1)[0]) != offset:
            raise SweepError(f"the sweep's journal on the storage ({root}/{JOURNAL_FOLDER}) has {info.base_name} "
                             f"where byte {offset} should start: two drivers wrote it at once, or a part was removed")
        offset += info.size
    return found


def _put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a file whole: an object store's put is; on a disk, a temporary file moved into place."""
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    local = isinstance(fs, pafs.LocalFileSystem)
    with fs.open_output_stream(path + ".tmp" if local else path) as stream:
        stream.write(data)
    if local:
        fs.move(path + ".tmp", path)


def _get(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()
