"""The command-line contracts of cmath-data, cmath-train and cmath-eval."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cmath_model import load_dataset
from cmath_model.cli import data_main, eval_main, train_main


def test_synth_command_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "m.parquet"
    assert data_main(["synth", "meld", "--scale", "tiny", "-o", str(out)]) == 0
    assert load_dataset(out).name == "meld"
    assert "valid" in capsys.readouterr().out


def test_train_with_seeds_writes_mean_std_and_per_seed(tiny_path, tmp_path, capsys):
    out = tmp_path / "run"
    code = train_main(["--data", str(tiny_path), "--epochs", "2", "--seeds", "2", "--set", "d=32", "batch_size=8",
                       "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("epoch   1") == 2 and "±" in printed  # per-epoch metrics are printed
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["per_seed"][1]["epochs"][-1]
    # Scores a person reads are percentages, as cmath-hpo prints them; the files keep fractions.
    assert f"val ACC {100 * last['val_acc']:.2f} W-F1 {100 * last['val_wf1']:.2f}" in printed
    per_seed = metrics["per_seed"]
    assert [r["seed"] for r in per_seed] == [0, 1]
    for key in ("best_val_wf1", "test_wf1_at_best_val", "test_acc_at_best_val", "best_test_wf1"):
        values = [r[key] for r in per_seed]
        assert metrics[key] == pytest.approx(statistics.fmean(values))
        assert metrics[f"{key}_std"] == pytest.approx(statistics.stdev(values))
    assert len(metrics["epochs"]) == 2 and "val_wf1" in metrics["epochs"][0]
    assert "optimistic" in metrics["best_test_wf1_note"]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data_sha256"] == load_dataset(tiny_path).sha256 and config["d"] == 32


def test_eval_reproduces_the_best_epoch_test_score(tiny_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--data", str(tiny_path), "--epochs", "3", "--set", "d=32", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert eval_main(["--checkpoint", str(out / "seed0" / "best")]) == 0
    evaluated = json.loads((out / "seed0" / "best" / "eval.json").read_text())
    assert evaluated["test_wf1"] == pytest.approx(metrics["test_wf1_at_best_val"], abs=1e-9)
    assert evaluated["test_acc"] == pytest.approx(metrics["test_acc_at_best_val"], abs=1e-9)
    assert "W-F1" in capsys.readouterr().out


def test_config_round_trip_through_yaml(tiny_path, tmp_path):
    config = {"dataset": "iemocap", "d": 40, "epochs": 1, "lr": "1e-3", "batch_size": 8, "data": str(tiny_path)}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert train_main(["--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r"), "--quiet"]) == 0
    written = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert written["lr"] == 1e-3 and written["d"] == 40


def test_a_config_with_the_retired_empty_extra_field_still_loads(tmp_path):
    """Checkpoints and configs written before `extra` was removed carry `extra: {}`; one that held
    anything is refused like any unknown field."""
    from cmath_model.config import load_config
    from cmath_model.errors import ConfigError

    (tmp_path / "old.yaml").write_text(yaml.safe_dump({"dataset": "iemocap", "d": 40, "extra": {}}))
    assert load_config(tmp_path / "old.yaml").d == 40
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"dataset": "iemocap", "extra": {"sweep": "s"}}))
    with pytest.raises(ConfigError, match="unknown field 'extra'"):
        load_config(tmp_path / "bad.yaml")


def test_mlflow_run_gets_params_and_epoch_history(tiny_path, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert train_main(["--data", str(tiny_path), "--epochs", "3", "--set", "d=32", "--out", str(tmp_path / "r"),
                       "--mlflow-uri", uri, "--experiment", "t", "--quiet"]) == 0
    import mlflow

    client = mlflow.MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("t").experiment_id])[0]
    from cmath_model.errors import command
    from cmath_model.tracking import local_artifact_dir

    weights = local_artifact_dir(run.info.artifact_uri) / "seed0" / "best" / "model.pt"
    assert weights.stat().st_ino == (tmp_path / "r" / "seed0" / "best" / "model.pt").stat().st_ino  # one copy
    # Even with --quiet, it says where the run went and how to look at it.
    assert (f"mlflow: run 'r' ({run.info.run_id}) in experiment 't' at {uri}; to see it: "
            f"{command('cmath-hpo')} ui --results {tmp_path}") in capsys.readouterr().out
    assert run.info.status == "FINISHED" and run.data.params["d"] == "32"
    history = client.get_metric_history(run.info.run_id, "val_wf1/seed0")
    assert [m.step for m in history] == [1, 2, 3]
    assert "metrics.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


@pytest.mark.parametrize("argv, needle", [
    (["--data", "missing.parquet"], "missing.parquet: no such dataset file"),
    (["--config", "nowhere.yaml"], "nowhere.yaml: no such config file"),
    (["--set", "heads=4"], "unknown field 'heads'"),
    (["--set", "gama1=1.0"], "unknown field 'gama1' (did you mean 'gamma1'?)"),
    (["--set", "d=64", "n_heads=5"], "config field 'n_heads': 5 does not divide d=64"),
])
def test_bad_input_is_one_error_line(argv, needle, tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import sys; from cmath_model.cli import train_main; "
                           "sys.exit(train_main(sys.argv[1:]))", *argv, "--results", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_hints_name_commands_as_they_run_here(monkeypatch, tmp_path):
    """A hint's command runs as printed: bare when the shell finds this install's, else by its
    path (.venv/bin/cmath-train from the checkout, as the README runs them)."""
    import os

    from cmath_model.errors import command

    bin_dir = Path(sys.executable).parent
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin:/bin")
    assert command("cmath-train") == "cmath-train"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(bin_dir.parent.parent)
    hint = command("cmath-train")
    assert hint == str(bin_dir.relative_to(bin_dir.parent.parent) / "cmath-train")  # .venv/bin/cmath-train
    assert subprocess.run([hint, "--help"], capture_output=True, timeout=120).returncode == 0
    monkeypatch.chdir(tmp_path)
    assert command("cmath-train") == str(bin_dir / "cmath-train")
    assert command("no-such-command") == "no-such-command"


@pytest.mark.parametrize("main, argv, message", [
    ("hpo", ["sweep", "--num-samples", "3"], "error: the following arguments are required: --space; "
                                              "see cmath-hpo sweep --help"),
    ("hpo", ["swep"], "error: argument command: invalid choice: 'swep'"),
    ("train", ["--bogus"], "error: unrecognized arguments: --bogus; see cmath-train --help"),
])
def test_a_usage_error_is_one_line_that_points_at_help(main, argv, message, capsys):
    from cmath_model.cli import train_main
    from hpo.cli import main as hpo_main

    with pytest.raises(SystemExit) as exited:
        {"hpo": hpo_main, "train": train_main}[main](argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err


def test_a_sweep_without_data_says_it_runs_on_the_built_in_synthetic_set(tmp_path, capsys):
    from hpo.cli import main as hpo_main

    space = Path(__file__).resolve().parents[1] / "search_spaces" / "iemocap.yaml"
    assert hpo_main(["sweep", "--space", str(space), "--results", str(tmp_path), "--dry-run"]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: ")]
    assert str(tmp_path / "data" / "synthetic-iemocap-small-seed0.parquet") in line
    assert "no --data given: the built-in synthetic IEMOCAP-shaped set" in line
