"""Storage paths and the checks a cluster sweep makes before it starts, without Ray:
where trial folders go, which addresses and GPU requests are refused, and when `resume` may take
over a sweep whose driver ran on another host."""

import json
import platform

import pyarrow.fs as pafs
import pytest
import yaml

from hpo.errors import SweepError
from hpo.resume import check_driver_gone
from hpo.storage import full_uri, has_redacted, join, public_query, redact, resolve_storage
from hpo.sweep import SweepOptions, plan_sweep

SPACE = {"dataset": "iemocap", "search": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
         "fixed": {"epochs": 2, "batch_size": 4}, "asha": {"grace_period": 1}}


@pytest.fixture
def options(tmp_path, tiny_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))

    def make(**changes):
        return SweepOptions(**{"space": space, "data": str(tiny_path), "results": tmp_path / "results",
                               "name": "s", **changes})

    return make


def test_a_relative_storage_folder_is_made_absolute(options, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = plan_sweep(options(storage="shared/sweeps"))
    assert plan.storage_path == str(tmp_path / "shared" / "sweeps")
    assert plan.ended_dir == str(tmp_path / "shared" / "sweeps" / "s" / "cmath_ended")
    assert resolve_storage("s3://bucket/sweeps") == "s3://bucket/sweeps"


def test_paths_join_in_front_of_a_uri_query():
    assert join("s3://b/p?endpoint_override=127.0.0.1:9000&scheme=http", "sweep", "cmath_ended") == \
        "s3://b/p/sweep/cmath_ended?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join("/nfs/sweeps/", "s") == "/nfs/sweeps/s"


def test_checkpoint_paths_keep_their_scheme():
    s3 = pafs.S3FileSystem(anonymous=True, region="us-east-1", endpoint_override="127.0.0.1:1")
    assert full_uri(s3, "bucket/sweeps/t/checkpoint_000002/best") == "s3://bucket/sweeps/t/checkpoint_000002/best"
    assert full_uri(pafs.LocalFileSystem(), "/nfs/t/best") == "/nfs/t/best"


def test_checkpoint_uris_keep_the_storages_endpoint_but_no_credentials():
    storage = "s3://bucket/sweeps?endpoint_override=127.0.0.1:9000&secret_key=hush&scheme=http&access_key=me"
    s3 = pafs.S3FileSystem(anonymous=True, region="us-east-1", endpoint_override="127.0.0.1:1")
    assert full_uri(s3, "bucket/sweeps/t/best", public_query(storage)) == \
        "s3://bucket/sweeps/t/best?endpoint_override=127.0.0.1:9000&scheme=http"
    assert redact(storage) == "s3://bucket/sweeps?endpoint_override=127.0.0.1:9000&secret_key=***&scheme=http" \
        "&access_key=***"
    assert redact("postgresql://cmath:hush@db:5432/optuna") == "postgresql://cmath:***@db:5432/optuna"
    assert redact("--mlflow-uri=http://me:hush@h:5000/") == "--mlflow-uri=http://me:***@h:5000/"
    for kept in ("postgresql://cmath@db/optuna", "sqlite:////a/b.db", "/nfs/sweeps", "s3://b/p"):
        assert redact(kept) == kept and not has_redacted(redact(kept))


def test_no_secret_of_a_url_reaches_the_sweeps_record(options, tmp_path):
    """sweep.json, the command line it records and the parent run's parameters keep the URLs
    without their passwords and credentials; a resume asks for them again."""
    from hpo.provenance import options_record, parent_params, provenance
    from hpo.resume import check_secrets_given

    plan = plan_sweep(options(study_storage="postgresql://cmath:hush1@db/optuna",
                              mlflow_uri="http://me:hush2@mlflow:5000",
                              storage="s3://b/sweeps?endpoint_override=h:1&secret_key=hush3",
                              command="cmath-hpo sweep --study-storage postgresql://cmath:hush1@db/optuna "
                                      "--mlflow-uri=http://me:hush2@mlflow:5000"))
    record = json.dumps({**provenance(plan), "params": parent_params(plan)}, default=str)
    assert "hush" not in record
    assert "postgresql://cmath:***@db/optuna" in record and "endpoint_override=h:1" in record
    values = options_record(plan.options)
    with pytest.raises(SweepError, match=r"recorded its --mlflow-uri without the secret in it \(http://me:\*\*\*@"
                                         r"mlflow:5000\); pass --mlflow-uri with it to resume"):
        check_secrets_given(values, plan.name)
    check_secrets_given({**values, "mlflow_uri": "http://me:hush2@mlflow:5000", "storage": "s3://b/sweeps",
                         "study_storage": "postgresql://cmath@db/optuna"}, plan.name)


@pytest.mark.parametrize("name", ["it's", "a b", ".hidden", "x/y", "-dash"])
def test_a_sweep_name_that_would_break_folders_or_mlflow_filters_is_refused(options, name):
    with pytest.raises(SweepError, match=r"--name .*: use letters, digits, '.', '-' and '_'"):
        plan_sweep(options(name=name))


def test_ray_client_addresses_are_refused_with_the_job_submission_route(options):
    with pytest.raises(SweepError, match="ray job submit"):
        plan_sweep(options(address="ray://head:10001"))


@pytest.mark.parametrize("gpus", [2, 1.5, -1])
def test_more_than_one_gpu_per_trial_is_refused(options, gpus):
    with pytest.raises(SweepError, match="one GPU"):
        plan_sweep(options(gpus_per_trial=gpus))


@pytest.mark.parametrize("gpus, device", [(0.25, "cuda"), (1, "cuda"), (0, "cpu")])
def test_whole_and_fractional_gpus_plan(options, gpus, device):
    base = plan_sweep(options(gpus_per_trial=gpus)).base
    assert (base.device, base.num_threads) == (device, 1)  # a trial's torch threads: its one reserved CPU


def _record(host: str, status: str | None) -> dict:
    return {"name": "s", "status": status, "driver": {"host": host, "pid": 1234, "cmdline": "cmath-hpo sweep"}}


def test_resume_refuses_while_a_driver_on_another_host_may_run():
    with pytest.raises(SweepError, match="host elsewhere.*--driver-gone"):
        check_driver_gone(_record("elsewhere", "running"))
    with pytest.raises(SweepError, match="--driver-gone"):
        check_driver_gone(_record("elsewhere", None))  # killed before its first status change
    check_driver_gone(_record("elsewhere", "running"), driver_gone=True)
    check_driver_gone(_record("elsewhere", "incomplete"))  # it ended (Ctrl-C): nothing to wait for


def test_resume_checks_a_driver_on_this_host_by_pid():
    import os

    from hpo.processes import command_line

    here = _record(platform.node(), "running")
    here["driver"].update(pid=os.getpid(), cmdline=command_line(os.getpid()))
    with pytest.raises(SweepError, match="still running"):
        check_driver_gone(here)
    here["driver"]["pid"] = 2 ** 22 + 1  # above pid_max's default: no such process
    check_driver_gone(here)
