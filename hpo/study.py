"""Where a sweep's Optuna study lives, and the journal that keeps it.

The study is written through at every change (a resume hands out again the trials the study has
and Ray's saved state lacks, hpo.search): in a database the user names (`--study-storage
postgresql://...`, any URL Optuna's RDBStorage opens), or by default as an Optuna journal beside
Ray's experiment: on the shared `--storage` (`<storage>/<name>/cmath_study/`), where any host
can resume the sweep, or in the sweep's own folder (`ray/cmath_study/`). A journal is read from
the store once and then served from memory, so the searcher's reads on Tune's loop do not grow
with the study (an sqlite study read its trials again at every ask; benchmarks.driver). When a
sweep stops, the study is copied into the sweep's optuna.db, so the folder stays self-contained
and readable with Optuna's own sqlite URL.

A study's place is written as one string (sweep.json records it): an RDB URL, or `journal:`
followed by a folder or object-store URI.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import uuid
from contextlib import closing
from pathlib import Path

import optuna
import pyarrow.fs as pafs
from optuna.storages.journal import BaseJournalBackend, JournalStorage

from .errors import SweepError
from .storage import redact

STUDY_FOLDER = "cmath_study"  # in the experiment's storage folder: the journal's objects
JOURNAL = "journal:"


def journal_location(spec: str) -> str | None:
    """The folder or URI of a `journal:` study place; None for a database URL."""
    return spec[len(JOURNAL):] if spec.startswith(JOURNAL) else None


def open_storage(spec: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for a study place.

    Args:
        spec: an RDB URL (`sqlite:///...`, `postgresql://...`) or `journal:<folder or URI>`.

    Returns:
        The storage; SweepError naming the place and the fix if it cannot be opened.
    """
    location = journal_location(spec)
    try:
        if location is not None:
            return JournalStorage(storage_journal(location))
        return optuna.storages.RDBStorage(spec)
    except SweepError:
        raise
    except Exception as exc:  # noqa: BLE001 - a driver missing, a server down, a bad URL
        raise SweepError(f"cannot open the Optuna study storage {redact(spec)} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); check that it is reachable "
                         f"from this host, or pass --study-storage a database URL it can open") from None


def copy_to_sqlite(spec: str, study_name: str, path: Path) -> None:
    """Copy the study into an sqlite file (replacing an older copy at once), for the sweep's own
    folder. Optuna copies trial by trial, a transaction each; into a file, every one rewrote the
    pages it touched and their rollback journal (123 MB for a 1,000-trial study, 1.4 MB of
    database): the copy is made in memory and written out whole through SQLite's backup.

    Args:
        spec: the study's place (see open_storage).
        study_name: its name.
        path: the sqlite file.
    """
    memory = optuna.storages.RDBStorage("sqlite:///:memory:")  # one connection per thread: one database
    optuna.copy_study(from_study_name=study_name, from_storage=open_storage(spec), to_storage=memory)
    written = path.with_name(path.name + ".tmp")
    written.unlink(missing_ok=True)
    with memory.engine.connect() as connection, closing(sqlite3.connect(written)) as target:
        connection.connection.driver_connection.backup(target)
    os.replace(written, path)


_journals: dict[str, StorageJournal] = {}
_journals_lock = threading.Lock()


def storage_journal(location: str) -> StorageJournal:
    """The one StorageJournal of this process for a location (see StorageJournal)."""
    with _journals_lock:
        if location not in _journals:
            _journals[location] = StorageJournal(location)
        return _journals[location]


class StorageJournal(BaseJournalBackend):
    """Optuna's journal as numbered objects in a folder or a bucket. An object store cannot
    append, so each append is one new object, named by the number of its first log; a reader
    takes them in that order. One driver writes a sweep's study at a time (a resume refuses
    while the previous driver may run), and every instance for a location in one process is the
    same object (`storage_journal`, also when unpickled), so the logs read once are kept in
    memory and each read after that costs nothing: the searcher's and the tables' studies see
    each other's writes without listing the store."""

    def __init__(self, location: str):
        self.location = location
        self._fs, self._root = pafs.FileSystem.from_uri(location)
        self._root = self._root.rstrip("/")
        self._logs: list[dict] | None = None
        self._lock = threading.Lock()

    def __reduce__(self):
        return storage_journal, (self.location,)

    def read_logs(self, log_number_from: int) -> list[dict]:
        with self._lock:
            return self._read()[log_number_from:]

    def append_logs(self, logs: list[dict]) -> None:
        with self._lock:
            known = self._read()
            # The random part keeps two drivers that wrongly write at once from overwriting each
            # other: the reader then finds two objects with one number and says so.
            path = f"{self._root}/{len(known):012d}-{uuid.uuid4().hex[:8]}.json"
            with self._fs.open_output_stream(path) as stream:
                stream.write(json.dumps(logs).encode())
            known.extend(logs)

    def _read(self) -> list[dict]:
        if self._logs is not None:
            return self._logs
        self._fs.create_dir(self._root, recursive=True)
        found = sorted((info.base_name, info.path) for info in
                       self._fs.get_file_info(pafs.FileSelector(self._root, allow_not_found=True))
                       if info.type == pafs.FileType.File and info.base_name.endswith(".json"))
        logs: list[dict] = []
        for index, (name, path) in enumerate(found):
            first = int(name.split("-", 1)[0])
            if first != len(logs):
                raise SweepError(f"the study journal {self.location} has {name} where log {len(logs)} should "
                                 f"start: two drivers wrote this sweep at once, or an object was removed; "
                                 f"resume from a copy of the storage taken before, or start a new sweep")
            with self._fs.open_input_stream(path) as stream:
                text = stream.read()
            try:
                logs.extend(json.loads(text))
            except ValueError:
                if index == len(found) - 1:  # a write cut short by a killed driver: it never returned
                    self._fs.delete_file(path)
                    break
                raise SweepError(f"the study journal {self.location}: {name} is corrupt; restore it from a "
                                 f"backup of the storage, or start a new sweep") from None
        self._logs = logs
        return logs
