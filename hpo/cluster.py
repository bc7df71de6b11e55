"""Ray for a sweep: start a private one or join a cluster, check it can run the sweep, size the
concurrency from it, and leave it with nothing of a private Ray left running."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable

from .errors import SweepError
from .plan import SweepPlan
from .processes import command_line, is_node_daemon, pids_using, stop
from .storage import check_storage_on_every_node


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


def start_ray(plan: SweepPlan) -> float:
    """Join the given cluster, or start a private local Ray (never one that happens to be running).
    Records the Ray session's folder in the plan: a resume finds what a killed driver left by it."""
    started = time.perf_counter()
    plan.ray_session_dir = init_ray(plan.address, plan.options.num_cpus, plan.options.verbose)
    return time.perf_counter() - started


def init_ray(address: str | None, num_cpus: int | None = None, verbose: bool = False) -> str | None:
    """ray.init on `address`, or a private local Ray with `num_cpus`; returns the session folder."""
    import logging

    import ray

    quiet = {"logging_level": logging.WARNING, "log_to_driver": verbose}
    if address:
        check_address(address)
        try:
            context = ray.init(address=address, **quiet)
        except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
            raise SweepError(f"could not join the Ray cluster at {address} ({str(exc).splitlines()[0][:160]}); "
                             f"with token authentication (Ray's default) set RAY_AUTH_MODE=token and give this "
                             f"machine the cluster's token (~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
    else:
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    return context.address_info.get("session_dir")


def check_cluster(plan: SweepPlan, log: Callable[[str], None] = print, poll: float = 1.0) -> None:
    """Ray queues a request no node can satisfy forever; refuse it instead. With
    --wait-for-resources SEC, first ask the cluster for one trial's resources (an autoscaler
    starts a node for them) and wait up to SEC seconds for a node that has them."""
    cpus, gpus = plan.options.cpus_per_trial, plan.options.gpus_per_trial
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    if node_fits(bundle):
        return
    wait = plan.options.wait_for_resources
    if wait > 0:
        from ray.autoscaler.sdk import request_resources

        log(f"waiting up to {wait:g}s for a node with {cpus:g} CPU and {gpus:g} GPU (asked the autoscaler for it)")
        request_resources(bundles=[bundle])
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(poll)
            if node_fits(bundle):
                return
    biggest = max(_alive_nodes(), key=lambda r: (r.get("GPU", 0), r.get("CPU", 0)), default={})
    waited = f" after waiting {wait:g}s" if wait > 0 else ""
    more = "" if wait > 0 else ", or on an autoscaling cluster wait for one with --wait-for-resources SEC"
    raise SweepError(f"no node has {cpus:g} CPU and {gpus:g} GPU for one trial{waited} (largest node: "
                     f"{biggest.get('CPU', 0):g} CPU, {biggest.get('GPU', 0):g} GPU); lower --cpus-per-trial/"
                     f"--gpus-per-trial or add a node that has them{more}")


def _alive_nodes() -> list[dict]:
    """Each alive node's resources."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def node_fits(bundle: dict) -> bool:
    return any(all(node.get(k, 0) >= v for k, v in bundle.items()) for node in _alive_nodes())


def size_concurrency(plan: SweepPlan, resources: dict) -> None:
    """Without --max-concurrent: the trials the cluster holds at once (its slots), but at most a
    quarter of the budget, rounded up.

    TPE proposes a trial only once the random start-up has finished, and K - 1 more trials start
    meanwhile, so start-up + K - 1 trials are random. SearchSpace.startup_size keeps that at or
    below half the budget for any K <= ceil(N / 4): TPE proposes at least half the trials. With
    every slot in use, a cluster with as many slots as trials would ask for all of them at once,
    before any has finished, and TPE would never be consulted."""
    fits = resources.get("CPU", 0) / plan.options.cpus_per_trial
    if plan.options.gpus_per_trial:
        fits = min(fits, resources.get("GPU", 0) / plan.options.gpus_per_trial)
    plan.slots = max(1, int(fits + 1e-9))
    if not plan.max_concurrent:
        plan.max_concurrent = min(plan.slots, math.ceil(plan.options.num_samples / 4))
    plan.n_startup = plan.space.startup_size(plan.options.num_samples, plan.max_concurrent)


def describe_concurrency(plan: SweepPlan) -> str:
    k, n = plan.max_concurrent, plan.options.num_samples
    why = ("--max-concurrent" if plan.options.max_concurrent else
           f"the cluster's {plan.slots} slots, at most a quarter of the {n} trials so TPE proposes at least half")
    return (f"{k} trials at a time ({why}); {plan.n_startup} random start-up trials, then TPE"
            if plan.options.sampler == "tpe" else f"{k} trials at a time ({why}); random search")


def join_cluster(plan: SweepPlan, log: Callable[[str], None] = print) -> tuple[float, dict]:
    """Start or join Ray, then check it can run this sweep: a node with a trial's resources, and
    storage that every node reads and writes (on a private local Ray there is only this machine).
    Sizes the concurrency from the cluster. Returns Ray's start-up seconds and what was checked."""
    import ray

    ray_seconds = start_ray(plan)
    check_cluster(plan, log)
    preflight = check_storage_on_every_node(plan.storage_path) if plan.address else None
    resources = ray.cluster_resources()
    size_concurrency(plan, resources)
    return ray_seconds, {"resources": resources, "preflight_seconds": preflight,
                         "nodes": len(_alive_nodes())}


def describe_cluster(plan: SweepPlan, ray_seconds: float, cluster: dict) -> str:
    r = cluster["resources"]
    where = f"joined {plan.address}" if plan.address else "local"
    checked = (f"; storage {plan.storage_path} checked on {cluster['nodes']} nodes in "
               f"{cluster['preflight_seconds']:.1f}s" if cluster["preflight_seconds"] is not None else "")
    return (f"ray: {where} in {ray_seconds:.1f}s; cluster {r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU{checked}; "
            f"mlflow {plan.tracking_uri}\n{describe_concurrency(plan)}")


def leave_cluster(plan: SweepPlan, timeout: float = 20.0) -> None:
    leave_ray(plan.address, plan.ray_session_dir, timeout)


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
