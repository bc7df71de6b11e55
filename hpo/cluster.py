"""Ray for a sweep: start a private one or join a cluster, check it can run the sweep, say how
many trials it holds at once, and leave it with nothing of a private Ray left running."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import SweepError
from .plan import SweepPlan, cluster_slots, describe_concurrency, with_slots
from .processes import command_line, is_node_daemon, pids_using, stop
from .storage import check_storage_on_every_node


@dataclass(frozen=True)
class Cluster:
    """The Ray a sweep's driver joined or started, as the sweep reports and records it."""

    session_dir: str | None  # a resume finds what a killed driver's private Ray left by it
    own: bool  # the sweep started (or joined) this Ray itself, and so leaves it; else a Ray this process had
    start_seconds: float
    resources: dict[str, float]  # the cluster's totals (Ray's names: CPU, GPU, ...)
    nodes: int
    preflight_seconds: float | None  # the storage check on every node (None on a private Ray)


@contextmanager
def joined_cluster(plan: SweepPlan, log: Callable[[str], None] = print) -> Iterator[tuple[SweepPlan, Cluster]]:
    """Join the plan's cluster (or start a private Ray), check it can run the sweep, and leave
    it when the block ends, however it ends. Without an address, in a process that already
    called ray.init() (a notebook, a script running several sweeps), the sweep runs on that Ray
    and leaves it running: Ray Tune's own way, and it saves a Ray's start and its trial
    workers' start (their imports) for every sweep after the first.

    Args:
        plan: the sweep's plan.
        log: where the wait for an autoscaled node is reported.

    Yields:
        The plan sized for the cluster's slots (a new plan), and the cluster.
    """
    import ray

    started = time.perf_counter()
    own = plan.address is not None or not ray.is_initialized()
    session = (init_ray(plan.address, plan.local_cpus, plan.options.verbose, plan.options.allow_open_cluster, log)
               if own else None)  # None: not the sweep's to stop, nor a resume's (hpo.resume.stop_leftovers)
    earlier = stop_signals_as_ctrl_c()
    asked = False
    try:
        seconds = time.perf_counter() - started
        asked = check_cluster(plan, log)
        # On a private Ray there is only this machine; a cluster's nodes must share the storage.
        nodes = len(_alive_nodes())
        preflight = check_storage_on_every_node(plan.storage_path) if plan.address or nodes > 1 else None
        resources = ray.cluster_resources()
        cluster = Cluster(session_dir=session, own=own, start_seconds=seconds, resources=resources, nodes=nodes,
                          preflight_seconds=preflight)
        yield with_slots(plan, cluster_slots(resources, plan.options)), cluster
    finally:
        if asked:
            withdraw_resource_request()
        for stop_signal, handler in earlier.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be put back
                signal.signal(stop_signal, handler)
        if own:
            leave_ray(plan.address, session)


def stop_signals_as_ctrl_c() -> dict:
    """SIGTERM (what `ray job stop` sends first, SIGKILL following RAY_JOB_STOP_WAIT_TIME_S later,
    and a system's shutdown) and SIGHUP (a closed terminal) end the sweep as Ctrl-C does: Tune
    stops its trials and saves its state, the trials' runs are closed KILLED with their best/,
    and `resume` continues it. Set after ray.init, whose own SIGTERM handlers (Python's and its
    core worker's) exit or abort at once. Only the main thread may set them.

    Returns:
        The handlers they replaced, by signal, for the sweep to put back when it leaves Ray.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}

    def as_ctrl_c(signum, frame) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    return {stop_signal: signal.signal(stop_signal, as_ctrl_c) for stop_signal in (signal.SIGTERM, signal.SIGHUP)}


def describe_cluster(plan: SweepPlan, cluster: Cluster) -> str:
    """Where the sweep runs, what the cluster has, and how many trials it runs at once."""
    r = cluster.resources
    where = f"joined {plan.address}" if plan.address else "local" if cluster.own else "this process's Ray (ray.init)"
    checked = (f"; storage {plan.storage_path} checked on {cluster.nodes} nodes in {cluster.preflight_seconds:.1f}s"
               if cluster.preflight_seconds is not None else "")
    return (f"ray: {where} in {cluster.start_seconds:.1f}s; cluster {r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU"
            f"{checked}; mlflow {plan.tracking_uri}\n{describe_concurrency(plan)}")


def check_address(address: str, timeout: float = 3.0) -> None:
    """An unreachable host:port fails here in seconds instead of hanging inside ray.init."""
    if address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise SweepError(f"Ray cluster at {address} is unreachable ({exc}); check the head's address and "
                         f"port (ray start --head prints it) or leave out --address for a local Ray") from None


def init_ray(address: str | None, num_cpus: int | None = None, verbose: bool = False, allow_open: bool = False,
             log: Callable[[str], None] = print) -> str | None:
    """ray.init on `address` once it is checked (reachable, and asking for a token: see
    check_authentication), or a private local Ray with `num_cpus` (never one that happens to be
    running).

    Args:
        address: a cluster's host:port (or `auto`); None starts a private local Ray.
        num_cpus: the private Ray's CPUs.
        verbose: workers' output reaches this process.
        allow_open: join a cluster without authentication anyway (with a warning).
        log: where that warning goes.

    Returns:
        The Ray session's folder.
    """
    import logging

    import ray

    quiet = {"logging_level": logging.WARNING, "log_to_driver": verbose}
    if address:
        check_address(address)
        check_authentication(address, allow_open, log)
        try:
            context = ray.init(address=address, **quiet)
        except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
            raise SweepError(f"could not join the Ray cluster at {address} ({str(exc).splitlines()[0][:160]}); "
                             f"with token authentication (Ray's default) set RAY_AUTH_MODE=token and give this "
                             f"machine the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
    else:
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    return context.address_info.get("session_dir")


# A client that carries no token joins the cluster, prints where its nodes listen, and leaves. Run
# in a process of its own: this one may hold a token and RAY_AUTH_MODE=token.
_ANONYMOUS_JOIN = """
import json, logging, sys
import ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
print(json.dumps(sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")})), flush=True)
ray.shutdown()
"""
# What Ray 2.60's client logs, about once a second, when a cluster refuses it for want of a token.
_TOKEN_REFUSED = ("Unauthenticated", "InvalidAuthToken")


def check_authentication(address: str, allow_open: bool = False, log: Callable[[str], None] = print,
                         timeout: float = 60.0) -> None:
    """Refuse a cluster that lets in a client without a token (token authentication off): anyone
    who reaches its ports runs code on every node. Unless `allow_open`, that is a SweepError when
    any node listens at an address other than loopback; otherwise a warning line. A cluster that
    asks for a token passes silently, if this driver runs with RAY_AUTH_MODE=token (without it,
    a SweepError at once instead of Ray's client retrying for 20 s).

    Args:
        address: the cluster's host:port.
        allow_open: the user accepts an open cluster (`--allow-open-cluster`).
        log: where the warning goes.
        timeout: seconds the anonymous client may take to be let in or refused.
    """
    try:
        nodes = anonymous_join(address, timeout)
    except SweepError as exc:
        if not allow_open:
            raise
        log(f"warning: {exc}")
        return
    warning = open_cluster_warning(address, nodes, allow_open, os.environ.get("RAY_AUTH_MODE", ""))
    if warning:
        log(warning)


def open_cluster_warning(address: str, nodes: list[str] | None, allow_open: bool, driver_auth_mode: str) -> str:
    """What joining a cluster comes to, given what a client without a token found there.

    Args:
        address: the cluster's host:port.
        nodes: the nodes' addresses the anonymous client saw; None: it was refused (a token cluster).
        allow_open: the user accepts an open cluster (`--allow-open-cluster`).
        driver_auth_mode: this driver's RAY_AUTH_MODE.

    Returns:
        The warning line to print ("" for a token cluster); SweepError where joining is refused.
    """
    if nodes is None:
        if driver_auth_mode.lower() != "token":
            # Ray 2.60's client reads the token only in token mode: it would retry for ~20 s, then
            # say the mode is "disabled", token file or not.
            raise SweepError(f"the Ray cluster at {address} asks for a token and this driver runs without "
                             f"RAY_AUTH_MODE=token; set it, with the cluster's token in ~/.ray/auth_token or "
                             f"RAY_AUTH_TOKEN (docs/cluster.md)")
        return ""
    exposed = [node for node in nodes if not is_loopback(node)]
    what = (f"the Ray cluster at {address} runs without authentication (a client with no token joined it)"
            + (f" and its nodes listen at {', '.join(exposed)}" if exposed else ", on loopback addresses only"))
    if exposed and not allow_open:
        raise SweepError(f"{what}: anyone who reaches them can run code on every node; restart every node with "
                         f"RAY_AUTH_MODE=token and the cluster's token (docs/cluster.md), or pass "
                         f"--allow-open-cluster to join it anyway")
    if driver_auth_mode.lower() == "token":
        # Seen with Ray 2.60: such a driver joins an open head, but every trial's actor dies unstarted.
        raise SweepError(f"{what}, and this driver runs with RAY_AUTH_MODE=token, whose trials never start on an "
                         f"open cluster; unset RAY_AUTH_MODE to join it, or restart every node with "
                         f"RAY_AUTH_MODE=token and the cluster's token (docs/cluster.md)")
    return (f"warning: {what}: anyone who reaches it can run code on its nodes; start every node with "
            f"RAY_AUTH_MODE=token and the cluster's token (docs/cluster.md)")


def anonymous_join(address: str, timeout: float = 60.0) -> list[str] | None:
    """The addresses of the cluster's nodes if a client with no token can join it; None if the
    cluster refuses it for want of a token. SweepError if neither happens within `timeout`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN_PATH=os.devnull, RAY_USAGE_STATS_ENABLED="0")
    probe = subprocess.Popen([sys.executable, "-c", _ANONYMOUS_JOIN, address], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    timer = threading.Timer(timeout, probe.kill)  # a probe that hangs is ended, so the reads below end
    timer.start()
    try:
        for line in probe.stderr:
            if any(word in line for word in _TOKEN_REFUSED):
                return None
        joined = probe.stdout.read().strip().splitlines()
    finally:
        timer.cancel()
        if probe.poll() is None:
            probe.kill()
        probe.wait(timeout=10)
    if joined and joined[-1].startswith("["):
        return json.loads(joined[-1])
    raise SweepError(f"could not tell within {timeout:.0f}s whether the Ray cluster at {address} asks for a token "
                     f"(a client with none neither joined nor was refused); check the address and that the head "
                     f"runs (--allow-open-cluster joins without this check)")


def is_loopback(host: str) -> bool:
    """Whether a node's address is this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_cluster(plan: SweepPlan, log: Callable[[str], None] = print, poll: float = 1.0) -> bool:
    """Ray queues a request no node can satisfy forever; refuse it instead. With
    --wait-for-resources SEC, first ask the cluster for one trial's resources (an autoscaler
    starts a node for them) and wait up to SEC seconds for a node that has them.

    Returns:
        Whether the autoscaler was asked (and so must be told when the sweep ends: a request
        stays in force until another replaces it, and would keep the node running).
    """
    cpus, gpus = plan.options.cpus_per_trial, plan.options.gpus_per_trial
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    if node_fits(bundle):
        return False
    wait = plan.options.wait_for_resources
    if wait > 0:
        from ray.autoscaler.sdk import request_resources

        log(f"waiting up to {wait:g}s for a node with {cpus:g} CPU and {gpus:g} GPU (asked the autoscaler for it)")
        request_resources(bundles=[bundle])
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(poll)
            if node_fits(bundle):
                return True
        withdraw_resource_request()
    biggest = max(_alive_nodes(), key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    waited = f" after waiting {wait:g}s" if wait > 0 else ""
    more = "" if wait > 0 else ", or on an autoscaling cluster wait for one with --wait-for-resources SEC"
    raise SweepError(f"no node has {cpus:g} CPU and {gpus:g} GPU for one trial{waited} (largest node: "
                     f"{biggest.get('CPU', 0):g} CPU, {biggest.get('GPU', 0):g} GPU); lower --cpus-per-trial/"
                     f"--gpus-per-trial or add a node that has them{more}")


def withdraw_resource_request() -> None:
    """Replace the sweep's request to the autoscaler with an empty one."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])


def _alive_nodes() -> list[dict]:
    """Each alive node's resources."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def nodes_that_fit(bundle: dict) -> set[str]:
    """The ids of the alive nodes that have every resource of `bundle` (Ray's names: CPU, GPU)."""
    import ray

    return {n["NodeID"] for n in ray.nodes()
            if n.get("Alive") and all(n["Resources"].get(k, 0) >= v for k, v in bundle.items())}


def node_fits(bundle: dict) -> bool:
    """Whether some alive node has every resource of `bundle`."""
    return bool(nodes_that_fit(bundle))


def leave_ray(address: str | None, session_dir: str | None, timeout: float = 20.0) -> None:
    """Disconnect; a private Ray is also waited for until none of its processes is left (a trial
    worker can take seconds to tear down after ray.shutdown), so when a sweep returns nothing it
    started is still running. Stragglers past `timeout`, and at once the processes of a node
    that joined this Ray, are stopped by PID."""
    import ray

    ray.shutdown()
    session = session_dir if address is None else None  # a private Ray: this process started it
    if session is None:
        return
    deadline = time.monotonic() + timeout
    while (left := pids_using(session)) and time.monotonic() < deadline:
        if all(is_node_daemon(command_line(pid)) for pid in left):
            break  # a node that joined this Ray: it would wait about a minute for its head, which is gone
        time.sleep(0.25)
    stop(pids_using(session), timeout=3.0)
