"""What every benchmark shares: its command line, the machine it ran on, the table it prints
and the JSON it writes, and running one measurement in a fresh process (so peak memory is that
measurement's own)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

OUT = Path("results/benchmarks")
DATA = OUT / "data"  # generated and imported datasets, reused between runs


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="smoke run: small sizes, a couple of minutes")
    p.add_argument("--out", default=str(OUT), help="folder for the JSON result (default results/benchmarks)")
    p.add_argument("--data-dir", default=str(DATA), type=Path,
                   help="where generated and imported datasets are kept between runs (default results/benchmarks/data)")
    p.add_argument("--point", help=argparse.SUPPRESS)  # internal: one measurement, JSON in, JSON out
    return p


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"host": platform.node(), "cpu": cpu, "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_point(module: str, point: dict, timeout: float = 3600, env: dict[str, str] | None = None) -> dict:
    """Run `python -m benchmarks.<module> --point '<json>'` (with `env` added to this process's
    environment) and return the JSON it prints last."""
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--point", json.dumps(point)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"benchmark point {point} failed (exit {done.returncode}): " + " | ".join(tail))
    return json.loads(lines[-1])


def emit_point(result: dict) -> None:
    print(json.dumps(result), flush=True)


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "-" if value is None else str(value)


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def save(name: str, args: argparse.Namespace, rows: list[dict], columns: list[str], **extra) -> Path:
    """Print the table and write everything to <out>/<name>.json (quick runs to <name>-quick.json)."""
    text = table(rows, columns)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}{'-quick' if args.quick else ''}.json"
    payload = {"benchmark": name, "quick": bool(args.quick), "command": " ".join([Path(sys.argv[0]).name,
               *sys.argv[1:]]), "machine": machine(), "columns": columns, "rows": rows, **extra}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path


MELD_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "meld"


def meld_text_dataset(work: Path, meld_dir: str | Path | None = None, label: str = "Emotion") -> Path:
    """The real MELD transcripts with their precomputed MiniLM sentence embeddings, imported
    once into a canonical text-only dataset under `work` (the shared folder is only read), with
    `label` (Emotion, 7 classes, or Sentiment, 3) as the label column."""
    from cmath_model.importers import import_csv

    source = Path(meld_dir or os.environ.get("CMATH_MELD_DIR") or MELD_DIR)
    embeddings = source / "meld_minilm_all.npy"
    if not embeddings.exists():
        raise SystemExit(f"{source}: no MELD transcripts with meld_minilm_all.npy here; pass --meld-dir or set "
                         f"CMATH_MELD_DIR to the folder holding train/dev/test_sent_emo.csv and the embeddings")
    out = work / ("meld-text-minilm.parquet" if label == "Emotion" else f"meld-{label.lower()}-text-minilm.parquet")
    if not out.exists():
        work.mkdir(parents=True, exist_ok=True)
        import_csv(source, out, embeddings=embeddings, columns={"label": label})
    return out


def synthetic_dataset(work: Path, scale: str, dataset: str = "iemocap") -> Path:
    from cmath_model.synth import write_synthetic

    out = work / f"synthetic-{dataset}-{scale}.parquet"
    if not out.exists():
        work.mkdir(parents=True, exist_ok=True)
        write_synthetic(out, dataset, scale)
    return out


@contextlib.contextmanager
def local_cluster(nodes: int, cpus: int) -> Iterator[dict[str, str]]:
    """A Ray cluster of `nodes` raylets on this machine (`ray start`: a head and nodes - 1 workers,
    `cpus` logical CPUs shared out among them), as a driver on a multi-node cluster meets it: its
    scheduling, object transfers and node heartbeats go through the head's GCS. Yields the
    environment a driver needs to join it (RAY_ADDRESS, and Ray 2.60's token authentication, which
    every node and driver of a cluster must share); stops only what it started, by PID (never
    `ray stop`: it is machine-wide)."""
    from hpo.processes import pids_using, stop

    ray = str(Path(sys.executable).parent / "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    joining = {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token"}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    # Short temp dirs: Ray's unix sockets live inside them and socket paths are limited to 107 bytes.
    folders = [tempfile.mkdtemp(prefix=f"rn{n}", dir="/tmp") for n in range(nodes)]
    shares = [cpus // nodes + (1 if n < cpus % nodes else 0) for n in range(nodes)]
    try:
        for n, (folder, share) in enumerate(zip(folders, shares)):
            role = (["--head", "--port", str(port), "--include-dashboard=false"] if n == 0
                    else ["--address", joining["RAY_ADDRESS"]])
            done = subprocess.run([ray, "start", *role, "--node-ip-address", "127.0.0.1", "--num-cpus", str(share),
                                   "--temp-dir", folder, "--disable-usage-stats"], env=env, capture_output=True,
                                  text=True, timeout=180)
            if done.returncode != 0:
                raise RuntimeError(f"ray start of node {n + 1} of {nodes} failed: "
                                   + " | ".join(done.stderr.strip().splitlines()[-3:]))
        yield joining
    finally:
        for folder in reversed(folders):
            stop(pids_using(folder))
            shutil.rmtree(folder, ignore_errors=True)
