"""Ray, the engine quantkit's distributed runs (eval cells, data-parallel GPTQ) use: one way to
import it, check a cluster's address, start a local runtime, or join a cluster.

A local runtime stays on this machine's loopback: Ray otherwise binds its services to the
node's network address. Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER to decide whether a node
advertises a network address at all; off, every service and worker uses 127.0.0.1. It is set
in the environment (inherited by the raylet and the workers Ray spawns) and in the already
imported constant, so it holds however Ray was imported.
"""

from __future__ import annotations

import logging
import os
import socket

from ..util.errors import QuantkitError

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_QUIET = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)


def import_ray():
    try:
        import ray
    except ImportError:
        raise QuantkitError("--ray needs Ray, which is not installed", hint="pip install 'quantkit[ray]'") from None
    return ray


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail in one line, before any work, when ADDRESS (HOST:PORT, or ray://HOST:PORT for Ray
    Client) is malformed or nothing listens there; "auto" (a cluster this machine belongs to) is
    left to Ray."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise QuantkitError(f"--ray {address}: give HOST:PORT of a Ray cluster's head (e.g. 10.0.0.5:6379)",
                            hint="or --ray alone for a local runtime")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise QuantkitError(f"--ray {address}: cannot reach the Ray cluster ({e.strerror or e})",
                            hint="start it with `ray start --head` there, or give --ray alone for a local runtime") from None


def start_local(num_cpus: int, **kw) -> None:
    """A local Ray runtime of `num_cpus` CPUs on loopback, quiet, no dashboard, whose workers
    import quantkit from where this process found it."""
    os.environ[LOOPBACK_ENV] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = import_ray()
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = src + (os.pathsep + old if old else "")
    try:
        ray.init(num_cpus=num_cpus, **{**_QUIET, **kw})
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def connect(address: str | None, num_cpus: int, **kw) -> bool:
    """Join the cluster at `address` (checked first), or start a local runtime of `num_cpus`
    CPUs, unless this process is already connected. True when this call connected (and so the
    caller shuts Ray down after its run)."""
    if address:
        check_address(address)
    ray = import_ray()
    if ray.is_initialized():
        return False
    if not address:
        start_local(num_cpus, **kw)
        return True
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        ray.init(address=address, **{**_QUIET, **kw})
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise QuantkitError(f"--ray {address}: cannot join the Ray cluster ({str(e).splitlines()[0]})") from None
    return True


def get(ray, refs):
    """ray.get, with a QuantkitError raised inside a task or actor re-raised as itself (its one
    line); any other failure propagates as Ray raised it."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, QuantkitError):
            raise cause from None
        raise
