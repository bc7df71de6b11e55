"""MLflow for every run this project logs: where a store keeps things, and one way to log a run.

`cmath-train`, a sweep's trials and parent run, and the re-scoring of a sweep's best trials all
log through these functions, with an explicit `MlflowClient` (never MLflow's global tracking
URI or active run, which a library must not change under its caller). MLflow is imported only
inside them: reading a store's address needs no MLflow.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
import urllib.parse
from contextlib import closing
from pathlib import Path

from .errors import ConfigError, command

MAX_PARAM_CHARS = 500  # MLflow refuses longer parameter values
MAX_BATCH_PARAMS = 100  # MLflow's limits per log_batch
MAX_BATCH_METRICS = 1000
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mssql", "oracle")


def default_tracking_uri(results: str | Path) -> str:
    """The sweeps' own store: `<results>/mlflow.db`, as an absolute sqlite URI."""
    return f"sqlite:///{(Path(results) / 'mlflow.db').resolve()}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (None for any other store)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def tracking_client(uri: str):
    """An `MlflowClient` on `uri`, for a process that may be the first to use the store. A new
    sqlite store starts as a copy of an empty one made once per MLflow version and kept in the
    user's cache folder: MLflow builds a sqlite store by replaying its schema's migrations, 1.7 s
    on a laptop's core, paid by every sweep and `cmath-train` with a results folder of its own.
    Where the copy cannot be made, MLflow builds the store as before.

    Args:
        uri: the tracking URI.

    Returns:
        The client.
    """
    from mlflow.tracking import MlflowClient

    database = sqlite_file(uri)
    if database is not None and not database.exists():
        try:
            _copy_of_an_empty_store(database)
        except (OSError, sqlite3.Error):
            pass  # MLflow creates it (slower, same result)
    return MlflowClient(uri)


def _empty_store_template() -> Path:
    """An empty sqlite store of the installed MLflow's schema, made once (atomically: sweeps may
    start side by side)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cmath-hpo"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if not template.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            made = Path(scratch) / "store.db"
            MlflowClient(f"sqlite:///{made}").search_experiments(max_results=1)  # builds the schema
            _sqlite_copy(made, Path(scratch) / "template.db")
            os.replace(Path(scratch) / "template.db", template)
    return template


def _copy_of_an_empty_store(database: Path) -> None:
    """Put an empty store at `database`, unless another process got there first."""
    database.parent.mkdir(parents=True, exist_ok=True)
    partial = database.with_name(f".{database.name}.{os.getpid()}.partial")
    try:
        _sqlite_copy(_empty_store_template(), partial)
        os.link(partial, database)  # never over a store another process made meanwhile
    except FileExistsError:
        pass
    finally:
        partial.unlink(missing_ok=True)


def _sqlite_copy(source: Path, target: Path) -> None:
    """A consistent copy of a sqlite database, through SQLite's own backup (journal and WAL included)."""
    with closing(sqlite3.connect(source)) as src, closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def check_artifact_home(uri: str) -> None:
    """Refuse a database tracking URI other than sqlite (postgresql://, mysql://, ...): such a store
    keeps no artifacts, and MLflow would put every run's files in ./mlruns of whatever folder the
    process runs in. A tracking server on that database keeps them (its artifact proxy)."""
    scheme = uri.split("://", 1)[0].split("+", 1)[0] if "://" in uri else ""
    if scheme in DATABASE_SCHEMES and sqlite_file(uri) is None:
        shown = f"{scheme}://{uri.split('://', 1)[1].split('@')[-1]}"  # no user or password in an error line
        raise ConfigError(f"--mlflow-uri {shown}: a {scheme} store keeps no artifacts (MLflow would "
                          f"write them to ./mlruns of the current folder); run a tracking server on it (mlflow "
                          f"server --backend-store-uri {scheme}://... --artifacts-destination ...) and pass its "
                          f"http:// address")


# What the experiment is, in MLflow's own terms: model training, not GenAI. MLflow's tools read it
# (its assistant; its UI when the GenAI/model-training switch is off). MLflow 3.17's UI itself opens
# every experiment in its GenAI view unless the link asks otherwise (hpo.ui.experiment_url).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def mlflow_experiment(client, name: str, uri: str) -> str:
    """The experiment's id, created if needed, of MLflow's model-training kind (EXPERIMENT_KIND).
    With a sqlite store its artifacts go beside the database (<folder>/mlartifacts/<name>), not
    into ./mlruns of whatever the working directory is; another database is refused
    (check_artifact_home)."""
    check_artifact_home(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        for key, value in EXPERIMENT_KIND.items():
            if key not in experiment.tags:  # one made before this tag (or by hand): a kind the user set stays
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    database = sqlite_file(uri)
    location = (database.resolve().parent / "mlartifacts" / name).as_uri() if database else None
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def open_run(client, experiment_id: str, name: str, tags: dict[str, str], params: dict) -> str:
    """Create a run with its tags and parameters; returns its id."""
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    log_params(client, run_id, params)
    return run_id


def log_params(client, run_id: str, values: dict) -> None:
    """Every value as a parameter (as text, cut to MLflow's limit), in as few calls as MLflow allows."""
    from mlflow.entities import Param

    params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in values.items()]
    for start in range(0, len(params), MAX_BATCH_PARAMS):
        client.log_batch(run_id, params=params[start:start + MAX_BATCH_PARAMS])


def metrics_at(values: dict, step: int, timestamp_ms: int | None = None, suffix: str = "") -> list:
    """The numeric entries of `values` (not booleans) as MLflow metrics at `step`."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return [Metric(f"{k}{suffix}", float(v), now, step) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def log_metrics(client, run_id: str, metrics: list) -> None:
    """Metrics in as few calls as MLflow allows."""
    for start in range(0, len(metrics), MAX_BATCH_METRICS):
        client.log_batch(run_id, metrics=metrics[start:start + MAX_BATCH_METRICS])


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder of a run's artifacts when the store keeps them on this machine's disk, else None."""
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    return Path(artifact_uri) if parsed.scheme == "" else None


def log_artifacts_once(client, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    """`log_artifacts`, keeping one copy on disk. With a local store (the default beside a sweep's
    results) a copy would double every checkpoint on the same disk; large files are hard-linked
    into the run's artifact folder instead, so each name stays valid when the other is deleted.
    Only weights (*.pt, written once) are linked: a small file such as metrics.json can be
    rewritten in place later, which would change both. A remote store (a tracking server, an
    object store) gets a real upload."""
    root = local_artifact_dir(client.get_run(run_id).info.artifact_uri)
    if root is None:
        client.log_artifacts(run_id, str(local_dir), artifact_path)
        return
    local_dir = Path(local_dir)
    destination = root / artifact_path if artifact_path else root
    for source in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        target = destination / source.relative_to(local_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        if source.suffix == ".pt":
            try:
                os.link(source, target)
                continue
            except OSError:  # another filesystem, or one without hard links: copy
                pass
        shutil.copy2(source, target)


def describe_run(where: dict) -> str:
    """Where a run is logged and how to look at it (`where`: uri, experiment, run_id, run_name)."""
    database = sqlite_file(where["uri"])
    if database is not None and database.name == "mlflow.db":  # the sweeps' store layout
        view = f"{command('cmath-hpo')} ui --results {database.parent}"
    else:
        view = f"{command('cmath-hpo')} ui --mlflow-uri {where['uri']}" if database else f"open {where['uri']}"
    return (f"mlflow: run '{where['run_name']}' ({where['run_id']}) in experiment '{where['experiment']}' "
            f"at {where['uri']}; to see it: {view}")
