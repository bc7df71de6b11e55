"""Where a sweep keeps Ray's trial folders, checkpoints and ended-trial records, and the check
that every node of the cluster can use it.

Ray Tune needs storage that every node sees: a trial on a node that cannot reach the storage
fails when it persists its first checkpoint, which Ray takes for a lost worker and retries. So
before anything is written or any trial starts, `check_storage_on_every_node` pins a zero-CPU
task to each alive node: it reads a marker the driver wrote and writes one back, which the
driver then reads. A node that cannot gets one error line naming it, the storage and the fix.

Storage is a local folder (made absolute: a relative one means nothing on another node) or a
URI pyarrow opens (`s3://bucket/path`, `gs://...`; credentials and endpoint come from the
environment each node has, e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL).
A URI may carry a query (`?endpoint_override=...`): paths are joined in front of it.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

PREFLIGHT_TIMEOUT_S = 60.0
FIX = ("pass --storage a folder every node mounts at the same path (e.g. NFS) or an object-store URI "
       "(s3://bucket/path)")


def is_uri(storage: str) -> bool:
    return "://" in storage


def resolve_storage(storage: str) -> str:
    """A local folder as an absolute path (pyarrow refuses a relative one); a URI as given."""
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())


def join(storage: str, *parts: str) -> str:
    """`storage` with path parts appended, before a URI's query string if it has one."""
    base, sep, query = storage.partition("?")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def full_uri(filesystem: pafs.FileSystem, path: str, query: str = "") -> str:
    """A path on a pyarrow filesystem as something a user (or `pyarrow.fs.FileSystem.from_uri`)
    can open again: local paths stay paths, object-store paths get their scheme back, and the
    storage's query (`endpoint_override=...`, see `public_query`) if it has one."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        return path
    return f"{filesystem.type_name}://{path.lstrip('/')}" + (f"?{query}" if query else "")


SECRET_PARAMETERS = ("access_key", "secret_key", "session_token", "password", "token")


def public_query(uri: str) -> str:
    """A URI's query without the credentials pyarrow accepts in it (access_key, secret_key,
    session_token): what may be written into tables and records."""
    query = uri.partition("?")[2]
    return "&".join(part for part in query.split("&") if part and part.split("=", 1)[0] not in SECRET_PARAMETERS)


def redact(uri: str) -> str:
    """A URI as it may be recorded: a password in it (`user:secret@host`) and credentials in its
    query become `***`; anything else is returned as it is."""
    if "://" not in uri:
        return uri
    base, sep, query = uri.partition("?")
    scheme, _, rest = base.partition("://")
    location, slash, path = rest.partition("/")
    credentials, at, host = location.rpartition("@")
    if at and ":" in credentials:
        location = f"{credentials.split(':', 1)[0]}:***@{host}"
    parts = [f"{part.split('=', 1)[0]}=***" if part.split("=", 1)[0] in SECRET_PARAMETERS else part
             for part in query.split("&")] if query else []
    return f"{scheme}://{location}{slash}{path}" + (sep + "&".join(parts) if parts else "")


def has_redacted(uri: str | None) -> bool:
    """Whether a recorded URI lost a secret to `redact`."""
    return bool(uri) and "***" in uri


def _write(uri: str, text: str) -> None:
    fs, path = pafs.FileSystem.from_uri(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode())


def _read(uri: str) -> str:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


def place_marker(folder: str) -> str:
    """Write a new marker at `folder`/driver for nodes to check with `probe_storage`; returns its token."""
    token = uuid.uuid4().hex
    _write(join(folder, "driver"), token)
    return token


def probe_storage(folder: str, token: str, node_id: str) -> str | None:
    """On one node: read the driver's marker, write this node's. None if both worked, else why not."""
    try:
        try:
            marker = _read(join(folder, "driver"))
        except FileNotFoundError:
            return f"the marker the driver wrote to {join(folder, 'driver')} is not there (this node sees another disk)"
        if marker != token:
            return "it reads a different marker than the driver wrote"
        _write(join(folder, node_id), token)
    except Exception as exc:  # noqa: BLE001 - whatever stops this node is the answer
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}".rstrip(": ")
    return None


def check_storage_on_every_node(storage: str, timeout: float = PREFLIGHT_TIMEOUT_S) -> float:
    """Every alive node of the connected Ray cluster reads and writes `storage`, or SweepError.
    Returns the seconds it took. Leaves nothing behind."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .errors import SweepError  # here, not at the top: each node imports this module for the probe

    started = time.perf_counter()
    token = uuid.uuid4().hex
    folder = join(storage, f".cmath-preflight-{token[:12]}")
    try:
        fs, root = pafs.FileSystem.from_uri(storage)
        made_root = not is_uri(storage) and fs.get_file_info(root).type == pafs.FileType.NotFound
        _write(join(folder, "driver"), token)
    except Exception as exc:  # noqa: BLE001
        raise SweepError(f"this machine (the driver) cannot write the storage {storage} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); {FIX}") from None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        probe = ray.remote(num_cpus=0, max_retries=0)(probe_storage)
        pending = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                   .remote(folder, token, n["NodeID"]): n for n in nodes}
        ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
        problems, gone = [], []
        for ref in ready:
            try:
                problem = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the check could not run there at all
                if not _alive(pending[ref]):  # it died since ray.nodes() listed it: it runs no trial either
                    gone.append(pending[ref])
                    continue
                raise SweepError(_cannot_run(pending[ref], exc)) from None
            if problem:
                problems.append((pending[ref], problem))
        problems += [(pending[ref], f"no answer within {timeout:.0f}s") for ref in late if _alive(pending[ref])]
        for ref in ready:  # the driver must see what each node wrote
            node = pending[ref]
            if any(node is n for n, _ in problems) or any(node is n for n in gone):
                continue
            try:
                seen = _read(join(folder, node["NodeID"]))
            except Exception as exc:  # noqa: BLE001
                seen = f"{type(exc).__name__}"
            if seen != token:
                problems.append((node, f"the driver cannot read what the node wrote ({seen[:80]})"))
        if problems:
            node, problem = problems[0]
            others = f" (and {len(problems) - 1} more nodes)" if len(problems) > 1 else ""
            raise SweepError(f"node {node['NodeID'][:12]} ({node.get('NodeManagerAddress', '?')}) cannot read and "
                             f"write the storage {storage}{others}: {problem}; {FIX}")
    finally:
        _remove(fs, root, folder, made_root)
    return time.perf_counter() - started


def _alive(node: dict) -> bool:
    """Whether a node Ray listed is still alive: a node that died meanwhile (killed, or found dead
    by Ray's health checks only now) fails its check without telling anything about the storage."""
    import ray

    return any(n["NodeID"] == node["NodeID"] and n.get("Alive") for n in ray.nodes())


def _cannot_run(node: dict, exc: Exception) -> str:
    """One line for a node where the check itself failed: most often, cmath-hpo is not installed
    there, and the node cannot load the check's code."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else type(exc).__name__)
    where = f"node {node['NodeID'][:12]} ({node.get('NodeManagerAddress', '?')})"
    if "No module named" in cause or "ModuleNotFoundError" in cause:
        return (f"{where} cannot load cmath-hpo's code ({cause[:200]}); install it there as on this machine "
                f"(pip install -e '.[cluster]' of this checkout, the same Python) and restart that node's `ray start`")
    return f"{where} could not run the storage check ({cause[:200]}); check that node's Ray logs"


def _remove(fs: pafs.FileSystem, root: str, folder: str, made_root: bool) -> None:
    try:
        fs.delete_dir(pafs.FileSystem.from_uri(folder)[1])
        if made_root:  # the driver's own folder, made only for the check: a refused sweep leaves no trace
            fs.delete_dir(root)
    except (OSError, FileNotFoundError):
        pass
