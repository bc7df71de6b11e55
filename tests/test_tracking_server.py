"""A sweep logs to a real MLflow tracking server whose store is PostgreSQL (Debian's, started by
the test as an unprivileged user in a temporary folder on 127.0.0.1, stopped by PID): a child run
per trial with every epoch, `best/` through the server's artifact proxy, the runs listed by the
server's REST API (what the UI shows), export-best naming the server. A database URI given
directly is refused: MLflow would put its artifacts in ./mlruns of the current folder."""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from cmath_model.errors import ConfigError
from hpo.export import export_best
from hpo.sweep import SweepOptions, run_sweep
from hpo.ui import start_ui, stop_ui

EPOCHS = 3
SPACE = {"dataset": "iemocap", "search": {"d": {"type": "categorical", "choices": [32, 48]}},
         "fixed": {"epochs": EPOCHS, "batch_size": 4}, "asha": {"grace_period": EPOCHS}}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres(tmp_path_factory, free_port):
    """A PostgreSQL server of this test's own, on 127.0.0.1, with an empty database `mlflow`."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    if not found:
        pytest.fail("the tracking-server test needs Debian's PostgreSQL: apt-get install postgresql (.ci/run does)")
    bin_dir = found[-1].parent
    folder = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))  # its socket path must stay short
    # PostgreSQL refuses to run as root: as root, the server runs as `nobody`.
    as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(folder, "nobody", "nogroup")
    port = free_port()
    subprocess.run([*as_user, bin_dir / "initdb", "-D", folder / "data", "--auth=trust", "-U", "cmath", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    log = open(tmp_path_factory.mktemp("pglog") / "postgres.log", "w")
    server = subprocess.Popen([*as_user, bin_dir / "postgres", "-D", folder / "data", "-h", "127.0.0.1", "-p",
                               str(port), "-k", folder], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([bin_dir / "pg_isready", "-h", "127.0.0.1", "-p", str(port)], capture_output=True,
                             timeout=10).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-2000:]
            time.sleep(0.2)
        subprocess.run([*as_user, bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "cmath", "mlflow"],
                       check=True, capture_output=True, timeout=60)
        yield f"postgresql://cmath@127.0.0.1:{port}/mlflow"
    finally:
        server.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory, free_port):
    """`mlflow server` on the PostgreSQL store, artifacts through its proxy (as `cmath-hpo ui` starts it)."""
    folder = tmp_path_factory.mktemp("server")
    process, url = start_ui(folder, port=free_port(), mlflow_uri=postgres)
    try:
        yield {"url": url, "artifacts": folder / "mlartifacts"}
    finally:
        stop_ui(process)


def test_a_sweep_logs_every_trial_to_a_postgresql_backed_server(tracking_server, tiny_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where MLflow would put ./mlruns if it fell back to it
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    url = tracking_server["url"]
    outcome = run_sweep(SweepOptions(space=space, data=str(tiny_path), num_samples=3, max_concurrent=2, num_cpus=2,
                                     results=tmp_path / "results", name="pg", mlflow_uri=url), log=lambda line: None)
    assert (outcome.status, outcome.counts["completed"], outcome.mlflow_failures) == ("finished", 3, 0)

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("pg").experiment_id
    trials = client.search_runs([experiment], filter_string="tags.`cmath.kind` = 'trial'")
    parents = client.search_runs([experiment], filter_string="tags.`cmath.kind` = 'sweep'")
    assert len(trials) == 3 and len(parents) == 1 and parents[0].info.status == "FINISHED"
    for run in trials:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_wf1")] == list(range(1, EPOCHS + 1))
        assert "best/model.pt" in [a.path for a in client.list_artifacts(run.info.run_id, "best")]
    # The weights went through the server's proxy into its artifact folder, none into ./mlruns.
    assert len(list(tracking_server["artifacts"].rglob("model.pt"))) == 3
    assert not (tmp_path / "mlruns").exists()

    # What the UI lists: the server's REST search.
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/runs/search", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"experiment_ids": [experiment], "filter": "tags.`cmath.kind` = 'trial'"}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        listed = {run["info"]["run_id"] for run in json.load(response)["runs"]}
    assert listed == {run.info.run_id for run in trials}

    exported = export_best(outcome.sweep_dir, tmp_path / "best.yaml")["provenance"]
    assert exported["mlflow_uri"] == url and exported["mlflow_run_id"] in listed


def test_a_database_uri_without_a_server_is_refused(postgres, tiny_path, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    with pytest.raises(ConfigError, match=r"a postgresql store keeps no artifacts .* pass its http:// address"):
        run_sweep(SweepOptions(space=space, data=str(tiny_path), results=tmp_path / "results", name="db",
                               mlflow_uri=postgres))
    assert not (tmp_path / "results" / "db").exists()
