"""A real two-node Ray cluster on this machine whose nodes do not share a disk, as two machines
would not: the head runs in this machine's view; the worker node runs in its own mount namespace
(`unshare -m`) with an empty tmpfs over `private/`, the folder that holds the driver's --results
and local storage, while `nfs/` stays visible to both, as an NFS mount would. An S3-compatible
server (moto) on 127.0.0.1 stands in for object storage.

What a user meets on such a cluster, for real: storage the worker cannot see is refused by the
preflight before anything starts; shared storage runs a sweep on both nodes; S3 storage runs a
sweep whose driver is killed and whose disk is lost, finished by a driver with an empty --results
(MLflow on a PostgreSQL-backed tracking server); `ray job submit` runs the sweep on the head; the
worker node is killed mid-sweep and its trial finishes on the head. Only what this module
started is stopped, by PID (never `ray stop`)."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pyarrow.fs as pafs
import pytest
import yaml
from mlflow.tracking import MlflowClient

import hpo
from cmath_model.tracking import default_tracking_uri
from hpo.processes import pids_using, stop
from hpo.study import JOURNAL, open_storage
from hpo.trials import read_journal, read_trials

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
BUCKET = "cmath"
EPOCHS = 10
SAMPLES = 4  # two waves of trials on the two nodes: a finished and a running trial on the worker
SPACE = {
    "dataset": "iemocap",
    "search": {"lr": {"type": "loguniform", "low": 5.0e-4, "high": 2.0e-3}},
    "fixed": {"d": 256, "epochs": EPOCHS, "batch_size": 4, "checkpoint_every": 2},
    "asha": {"grace_period": EPOCHS},
}


@pytest.fixture(scope="module")
def s3(free_port):
    """moto's S3 server on 127.0.0.1, and the standard AWS variables pyarrow (and so Ray) reads."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="moto-", suffix=".log", delete=False)
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                              stderr=subprocess.STDOUT)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2).read()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-2000:]
                time.sleep(0.3)
        request = urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/{BUCKET}", method="PUT")
        urllib.request.urlopen(request, timeout=10).read()  # create the bucket (anonymous calls work on moto)
        yield env
    finally:
        stop([server.pid])


def _ray_start(env: dict, *args: str, namespace: list[str] = (), num_cpus: int = 1) -> None:
    subprocess.run([*namespace, RAY, "start", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
                    *_own_agent_port(), "--disable-usage-stats", *args], env=env, check=True, capture_output=True,
                   timeout=120)


def _own_agent_port() -> list[str]:
    """A node's dashboard agent serves HTTP on the host's address, port 52365 unless told: with
    another Ray on this machine holding it (a test in the other pytest process), the head's agent
    failed to bind and every `ray job submit` got 500 "No available agent to submit job"."""
    with socket.socket() as s:
        s.bind(("", 0))
        return ["--dashboard-agent-listen-port", str(s.getsockname()[1])]


@contextlib.contextmanager
def _default_agent_port_taken():
    """Port 52365 (a dashboard agent's default) held by a listener of ours, unless something holds it already."""
    blocker = socket.socket()
    try:
        blocker.bind(("", 52365))
        blocker.listen()
    except OSError:
        pass  # taken already: the condition this stands for
    try:
        yield
    finally:
        blocker.close()


def _private_namespace(private: Path) -> list[str]:
    """A command prefix: run in a new mount namespace with an empty tmpfs over `private` (a folder)."""
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode != 0:
        pytest.fail(f"`unshare -m` is not permitted here ({probe.stderr.strip()}); these tests give the worker "
                    f"node its own view of the disk and need root or CAP_SYS_ADMIN")
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs tmpfs "{private}" && exec "$0" "$@"']


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3, free_port):
    root = tmp_path_factory.mktemp("cluster")
    private, nfs = root / "private", root / "nfs"
    private.mkdir()
    nfs.mkdir()
    (private / "marker").write_text("only the head sees this")
    # docs/cluster.md's recipe: a fresh home (no token yet), the token made first, every node,
    # driver and `ray job submit` with RAY_AUTH_MODE=token and that token.
    home = root / "home"
    home.mkdir()
    env = {**os.environ, **s3, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # so a submitted job finds cmath-hpo
    env.pop("RAY_AUTH_TOKEN", None)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    assert (home / ".ray" / "auth_token").exists()
    # Short temp dirs: Ray's unix sockets live inside them and socket paths are limited to 107 bytes.
    head_dir, worker_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp"), tempfile.mkdtemp(prefix="rw", dir="/tmp")
    port, dashboard = free_port(), free_port()
    try:
        with _default_agent_port_taken():  # as by another Ray on the machine (CI runs two test processes)
            _ray_start(env, "--head", "--port", str(port), "--temp-dir", head_dir, "--include-dashboard=true",
                       "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard))
            _ray_start(env, "--address", f"127.0.0.1:{port}", "--temp-dir", worker_dir,
                       namespace=_private_namespace(private))
        list_nodes = (f"import json, ray; ray.init(address='127.0.0.1:{port}', logging_level='ERROR'); "
                      "print(json.dumps([[n['NodeID'], n['ObjectStoreSocketName']]"
                      " for n in ray.nodes() if n['Alive']]))")
        nodes = json.loads(subprocess.run([sys.executable, "-c", list_nodes], env=env, capture_output=True, text=True,
                                          check=True, timeout=120).stdout.strip().splitlines()[-1])
        assert len(nodes) == 2
        node_of = {("worker" if socket_name.startswith(worker_dir) else "head"): node_id
                   for node_id, socket_name in nodes}
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env,
               "head_dir": head_dir, "worker_dir": worker_dir, "nodes": {k: v[:12] for k, v in node_of.items()},
               "node_ids": node_of, "private": private, "nfs": nfs}
    finally:
        # After SIGTERM a raylet waits ~10 s for its head; nothing of either node is needed by then.
        stop(pids_using(worker_dir), timeout=3)
        stop(pids_using(head_dir), timeout=3)
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)


def _space(folder: Path, **fixed) -> Path:
    path = folder / "space.yaml"
    fixed = {**SPACE["fixed"], **fixed}
    path.write_text(yaml.safe_dump({**SPACE, "fixed": fixed, "asha": {"grace_period": fixed["epochs"]}}))
    return path


def _sweep_command(space: Path, data: Path, results: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hpo.cli", "sweep", "--space", str(space), "--data", str(data),
            "--results", str(results), "--name", name, *extra]


def _mlflow_trial_runs(results: Path, experiment: str):
    client = MlflowClient(default_tracking_uri(results))
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              filter_string="tags.`cmath.kind` = 'trial'")
    return client, runs


def test_preflight_refuses_storage_the_worker_node_cannot_see(cluster, tiny_path):
    """The driver's own folder is not on the worker node: refused before anything is written."""
    results = cluster["private"] / "results"
    started = time.monotonic()
    done = subprocess.run(_sweep_command(_space(cluster["private"]), tiny_path, results, "private",
                                         "--num-samples", "2", "--address", cluster["address"]),
                          env=cluster["env"], capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1, done.stderr[-3000:]
    # The cluster asks for a token (the recipe's): the authentication check passed without a word.
    assert "without authentication" not in done.stdout + done.stderr
    assert f"node {cluster['nodes']['worker']}" in errors[0]
    assert str((results / "private").resolve()) in errors[0]
    assert "--storage" in errors[0] and "s3://" in errors[0]
    assert not (results / "private").exists()  # nothing was written, no trial started
    print(f"preflight refusal took {seconds:.1f}s from the command's start: {errors[0]}")


def test_a_driver_without_the_token_setting_is_refused_in_one_line(cluster, tiny_path):
    """The token is in ~/.ray/auth_token but RAY_AUTH_MODE is unset: Ray's client would retry for
    about 20 s and then say the mode is 'disabled'. The sweep says what to set, before ray.init."""
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_MODE"}
    results = cluster["nfs"] / "results-no-mode"
    started = time.monotonic()
    done = subprocess.run(_sweep_command(_space(cluster["private"]), tiny_path, results, "no-mode", "--num-samples",
                                         "1", "--address", cluster["address"], "--storage", str(cluster["nfs"] / "s")),
                          env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stdout[-2000:] + done.stderr[-3000:]
    assert "asks for a token and this driver runs without RAY_AUTH_MODE=token" in errors[0], errors[0]
    assert not (results / "no-mode").exists()
    print(f"refused in {time.monotonic() - started:.1f}s: {errors[0]}")


def test_a_sweep_whose_driver_is_killed_is_finished_from_another_host(cluster, tracking_server, tiny_path,
                                                                      monkeypatch):
    """docs/cluster.md's recipe: Ray's trial folders, checkpoints, the study and the sweep's records
    on S3, MLflow on a PostgreSQL-backed tracking server. The driver is killed mid-sweep and its
    --results folder deleted, as when its machine is lost; `cmath-hpo resume s3://.../NAME` with a
    fresh, empty --results finishes the sweep: every trial once in the tables, the study and MLflow."""
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, cluster["env"][key])  # this process reads the study and checkpoints on S3
    first, name, url = cluster["private"] / "results-host-a", "moved", tracking_server["url"]
    storage = f"s3://{BUCKET}/sweeps"
    space = _space(cluster["private"], d=64, epochs=6)
    started = time.monotonic()
    log = cluster["private"] / "driver-s3.log"  # a file, not a pipe nobody reads while the driver runs
    with open(log, "w") as out:
        driver = subprocess.Popen(_sweep_command(space, tiny_path, first, name, "--num-samples", "4",
                                                 "--address", cluster["address"], "--storage", storage,
                                                 "--mlflow-uri", url),
                                  env=cluster["env"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, mid_sweep = time.monotonic() + 300, False
        while time.monotonic() < deadline and driver.poll() is None:
            journal = read_journal(first / name)  # no early stops: a trial has ended once its last epoch is in
            ended = {t for t, rows in journal.items() if max(r["epoch"] for r in rows) == 6}
            if ended and any(max(r["epoch"] for r in rows) >= 3 for t, rows in journal.items() if t not in ended):
                mid_sweep = True
                break
            time.sleep(0.1)
        assert driver.poll() is None, log.read_text()[-3000:]
        assert mid_sweep, "the sweep never reached mid-sweep (a trial ended, another past epoch 3) within 300 s"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
    killed_at, killed_after = time.time(), time.monotonic() - started
    reached = {t: max(r["epoch"] for r in rows) for t, rows in read_journal(first / name).items()}
    shutil.rmtree(first)  # the first driver's disk is gone
    second = cluster["private"] / "results-host-b"
    resumed = subprocess.run([sys.executable, "-m", "hpo.cli", "resume", f"{storage}/{name}", "--results",
                              str(second)], env=cluster["env"], capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"sweep {name} finished: 4 completed" in resumed.stdout, resumed.stdout[-3000:]
    sweep_dir = second / name

    trials = read_trials(sweep_dir)
    assert len(trials) == 4 and trials["trial_id"].is_unique and set(trials["end_state"]) == {"completed"}
    history = pd.read_parquet(sweep_dir / "history.parquet")
    for trial_id in trials["trial_id"]:  # every epoch of every trial, from the mirror or the checkpoints
        assert sorted(history[history["trial_id"] == trial_id]["epoch"]) == list(range(1, 7)), trial_id
    journal = read_journal(sweep_dir)
    for trial_id, epochs in reached.items():
        # Past epoch 2 a trial had its first checkpoint (checkpoint_every 2): it resumes from
        # there or later, whether Ray's saved state knew the trial or it is carried on.
        again = sorted(r["epoch"] for r in journal[trial_id] if r["received_at"] > killed_at)
        if epochs >= 3:
            assert not again or again[0] > 2, (trial_id, epochs, again, trials.set_index("trial_id").loc[trial_id])
    for trial_id in ended:  # ended before the kill: replayed, never trained again
        row = trials[trials["trial_id"] == trial_id].iloc[0]
        assert row["epochs_redone"] == 0 and row["restarts"] == 0
    assert all(str(uri).startswith(f"{storage}/{name}/") for uri in trials["checkpoint"])
    fs = pafs.S3FileSystem(endpoint_override=cluster["env"]["AWS_ENDPOINT_URL"], access_key="testing",
                           secret_key="testing", region="us-east-1")
    for uri in trials["checkpoint"]:
        path = uri.removeprefix("s3://")
        assert fs.get_file_info(f"{path}/model.pt").type == pafs.FileType.File
        trial_dir = path.rsplit("/", 2)[0]
        kept = [i.base_name for i in fs.get_file_info(pafs.FileSelector(trial_dir)) if i.base_name.startswith("checkp")]
        assert kept == [path.rsplit("/", 2)[1]]  # older checkpoints pruned once best/ was uploaded
    ended_records = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/sweeps/{name}/cmath_ended"))
    assert {info.base_name.removesuffix(".json") for info in ended_records} == set(trials["trial_id"])

    study = optuna.load_study(study_name=name, storage=open_storage(f"{JOURNAL}{storage}/{name}/cmath_study"))
    assert sorted(t.state.name for t in study.get_trials()) == ["COMPLETE"] * 4
    assert {t.user_attrs["ray_trial_id"] for t in study.get_trials()} == set(trials["trial_id"])
    copied = optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert len(copied.get_trials()) == 4

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([experiment], filter_string="tags.`cmath.kind` = 'trial'")
    assert sorted(run.data.tags["cmath.trial_id"] for run in runs) == sorted(trials["trial_id"])
    for run in runs:
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_wf1")] == list(range(1, 7))
        assert {a.path for a in client.list_artifacts(run.info.run_id, "best")} >= {"best/model.pt",
                                                                                   "best/metrics.json"}
    parents = client.search_runs([experiment], filter_string="tags.`cmath.kind` = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["cmath.resumes"] == "1"
    export = cluster["private"] / "best-s3.yaml"
    done = subprocess.run([sys.executable, "-m", "hpo.cli", "export-best", str(sweep_dir), "-o", str(export)],
                          env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(export.read_text())["provenance"]["checkpoint"].startswith(f"{storage}/{name}/")
    print(f"S3 sweep killed after {killed_after:.0f}s and finished from a fresh --results: {wall:.0f}s wall in all")


def test_a_node_without_the_package_is_named_by_the_preflight(cluster, tiny_path):
    """A third node whose Python cannot load cmath-hpo (an empty tmpfs over the package's folder, in
    a mount namespace of its own) is refused before anything starts, in one line naming the node
    and the fix; it was Ray's traceback of a task that could not be loaded."""
    package = Path(hpo.__file__).resolve().parent
    extra = tempfile.mkdtemp(prefix="rx", dir="/tmp")
    try:
        _ray_start(cluster["env"], "--address", cluster["address"], "--temp-dir", extra,
                   namespace=_private_namespace(package))
        results = cluster["nfs"] / "results-nopkg"
        done = subprocess.run(_sweep_command(_space(cluster["private"]), tiny_path, results, "nopkg", "--num-samples",
                                             "1", "--address", cluster["address"], "--storage",
                                             str(cluster["nfs"] / "sweeps")),
                              env=cluster["env"], capture_output=True, text=True, timeout=300)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 2 and len(errors) == 1, done.stdout[-2000:] + done.stderr[-3000:]
        assert "cannot load cmath-hpo's code" in errors[0] and "pip install -e '.[cluster]'" in errors[0], errors[0]
        assert "Traceback" not in done.stderr and not (results / "nopkg").exists()
        print(errors[0])
    finally:
        stop(pids_using(extra), timeout=3)
        shutil.rmtree(extra, ignore_errors=True)


def test_job_submission_runs_the_sweep_on_the_head(cluster, tiny_path):
    """docs/cluster.md's recipe: `ray job submit` to the head's dashboard; the driver runs on the head."""
    results = cluster["private"] / "results-job"  # absolute, on the head: where the driver runs
    storage = cluster["nfs"] / "sweeps"
    space = _space(cluster["private"], d=64, epochs=3)
    started = time.monotonic()
    done = subprocess.run([RAY, "job", "submit", "--address", cluster["dashboard"], "--",
                           "cmath-hpo", "sweep", "--space", str(space), "--data", str(tiny_path),
                           "--num-samples", "2", "--results", str(results), "--storage", str(storage),
                           "--name", "job"], env=cluster["env"], capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + _head_dashboard_logs(cluster)
    assert re.search(r"sweep job finished: 2 completed", done.stdout), done.stdout[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    record = json.loads((results / "job" / "sweep.json").read_text())
    assert record["status"] == "finished" and record["address"]  # joined the cluster it was submitted to
    assert record["storage"]["path"] == str(storage)
    print(f"job submission: {wall:.0f}s from submit to the job's end")


def _head_dashboard_logs(cluster) -> str:
    """The last lines of the head's dashboard logs, which say why a job found no agent."""
    logs = Path(cluster["head_dir"]) / "session_latest" / "logs"
    tails = []
    for path in sorted(logs.glob("dashboard*.log")):
        lines = [line for line in path.read_text(errors="replace").splitlines() if "ResourceRoute" not in line]
        tails.append(f"\n--- {path.name} ---\n" + "\n".join(lines[-15:]))
    return "".join(tails)


def _worker_trial_running(sweep_dir: Path, worker_node: str, running: set) -> str | None:
    """A running trial whose latest result came from the worker node, past a checkpoint."""
    for trial_id, rows in read_journal(sweep_dir).items():
        if trial_id in running and 3 <= rows[-1]["epoch"] < EPOCHS - 1 and rows[-1]["node"] == worker_node:
            return trial_id
    return None


def test_sweep_on_shared_storage_survives_losing_the_worker(cluster, tiny_path):
    """Runs last in this module: it kills the worker node."""
    results, name = cluster["private"] / "results", "two-nodes"
    storage = cluster["nfs"] / "sweeps"
    started = time.monotonic()
    log = open(cluster["nfs"] / "two-nodes.log", "w")
    driver = subprocess.Popen(_sweep_command(_space(cluster["private"], d=128), tiny_path, results, name,
                                             "--num-samples", str(SAMPLES), "--max-concurrent", "2",
                                             "--address", cluster["address"],
                                             "--storage", str(storage), "--max-retries", "2"),
                              env=cluster["env"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sweep_dir = results / name
    try:
        # Wait until a trial finished on the worker and another is running there, then kill that node.
        victim, deadline = None, time.monotonic() + 300
        while victim is None and time.monotonic() < deadline and driver.poll() is None:
            # From the journal (the tables lag by up to 10 s); no early stops: a trial has ended
            # once its last epoch is in.
            journal = read_journal(sweep_dir)
            ended_on_worker = [t for t, rows in journal.items() if rows[-1]["epoch"] == EPOCHS
                               and all(r["node"] == cluster["nodes"]["worker"] for r in rows)]
            if ended_on_worker:
                running = {t for t, rows in journal.items() if rows[-1]["epoch"] < EPOCHS}
                victim = _worker_trial_running(sweep_dir, cluster["nodes"]["worker"], running)
            time.sleep(0.1)
        assert victim, "never saw a finished and a running trial on the worker node"
        for pid in pids_using(cluster["worker_dir"]):
            os.kill(pid, signal.SIGKILL)
        assert driver.wait(timeout=300) == 0, (cluster["nfs"] / "two-nodes.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    wall = time.monotonic() - started

    trials = read_trials(sweep_dir)
    assert len(trials) == SAMPLES and set(trials["end_state"]) == {"completed"}
    used = set(",".join(trials["nodes"]).split(","))
    assert used == {cluster["nodes"]["head"], cluster["nodes"]["worker"]}
    moved = trials[trials["trial_id"] == victim].iloc[0]
    assert moved["restarts"] == 1
    assert moved["nodes"].split(",") == [cluster["nodes"]["worker"], cluster["nodes"]["head"]]
    epochs = [r["epoch"] for r in read_journal(sweep_dir)[victim]]
    assert sorted(set(epochs)) == list(range(1, EPOCHS + 1)) and epochs.count(1) == 1  # not restarted from 0

    client, runs = _mlflow_trial_runs(results, name)
    assert len(runs) == SAMPLES
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_wf1")]
        assert steps == list(range(1, EPOCHS + 1)) and run.info.status == "FINISHED"
        assert "best/model.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "best")}
    for path in trials["checkpoint"]:
        assert str(path).startswith(str(storage / name)) and (Path(path) / "model.pt").exists()
    export = cluster["nfs"] / "best.yaml"
    exported = subprocess.run([sys.executable, "-m", "hpo.cli", "export-best", str(sweep_dir), "-o", str(export)],
                              env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr
    assert yaml.safe_load(export.read_text())["provenance"]["trial_id"] in set(trials["trial_id"])
    reported = subprocess.run([sys.executable, "-m", "hpo.cli", "report", str(sweep_dir)], env=cluster["env"],
                              capture_output=True, text=True, timeout=300)
    assert reported.returncode == 0, reported.stderr
    assert (sweep_dir / "report" / "confusion.png").exists()  # drawn from the best trial's best/
    print(f"trial {victim} moved from the worker to the head; epochs redone {moved['epochs_redone']}; "
          f"wall {wall:.0f}s")


def test_a_node_that_joins_after_the_preflight_and_cannot_see_the_storage_gets_no_trials(cluster, tiny_path):
    """A node that joins once the sweep has passed its preflight (an autoscaler, a replaced
    machine), in a mount namespace where the shared folder is an empty tmpfs, as a machine whose
    NFS mount failed. Before each trial checked the storage, trials placed there trained and wrote
    their checkpoints to that node's own disk, lost to the sweep, and the sweep exited 0."""
    results, name = cluster["private"] / "results-late", "late"
    storage = cluster["nfs"] / "late"
    late_dir = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    out = cluster["private"] / "driver-late.log"
    env = {**cluster["env"], "PYTHONUNBUFFERED": "1"}  # its lines reach the log as they are printed
    with open(out, "w") as log:
        driver = subprocess.Popen(_sweep_command(_space(cluster["private"], d=64, epochs=2), tiny_path, results, name,
                                                 "--num-samples", "4", "--max-concurrent", "4",
                                                 "--address", cluster["address"], "--storage", str(storage)),
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    late = None
    try:
        deadline = time.monotonic() + 180
        while f"sweep {name}: 4 trials" not in out.read_text():  # past the preflight, its record open
            assert driver.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(0.05)
        # The driver waits (SIGSTOP) while the node joins, so the first trials find it there.
        os.kill(driver.pid, signal.SIGSTOP)
        try:
            _ray_start(cluster["env"], "--address", cluster["address"], "--temp-dir", late_dir,
                       namespace=_private_namespace(cluster["nfs"]), num_cpus=2)
        finally:
            os.kill(driver.pid, signal.SIGCONT)
        code = driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        stop(pids_using(late_dir), timeout=10)
        shutil.rmtree(late_dir, ignore_errors=True)
    text = out.read_text()
    known = {cluster["node_ids"]["head"], cluster["node_ids"]["worker"]}
    trials = read_trials(results / name)
    assert len(trials) == 4 and set(trials["end_state"]) == {"completed"}
    used = set(",".join(trials["nodes"]).split(","))
    assert used <= {node[:12] for node in known}, used  # no epoch was trained on the late node
    assert code == 1, text[-3000:]
    faults = json.loads((results / name / "node_faults.json").read_text())
    [late] = faults  # one node could not use the storage: the late one
    # How many trials Ray places on the late node depends on when it registers (once seen in CI
    # under load: one). The second fault excludes it; one fault alone moves the trial and goes on.
    moved, excluded = faults[late]["faults"], faults[late]["excluded"]
    assert late not in known and moved >= 1 and excluded == (moved >= 2), faults
    assert "is not there (this node sees another disk)" in faults[late]["problem"]
    warnings = [line for line in text.splitlines() if line.startswith("warning: [") and late[:12] in line]
    assert len(warnings) == moved and ("the node gets no more trials of this sweep" in text) == excluded, text
    assert f"node {late[:12]} could not use the sweep's storage ({moved} trials moved off it" \
           + (", then it got no more trials)" if excluded else "):") in text
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{results / name / 'optuna.db'}")
    assert {t.state.name for t in study.trials} == {"COMPLETE"}  # none told to Optuna as a failure
    print(f"late node {late[:12]}: {moved} trials moved off it" + (", then excluded" if excluded else ""))
