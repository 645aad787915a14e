"""Where Ray work runs: the cluster at ``--address`` or ``RAY_ADDRESS``, else a cluster started on this machine
with ``ray start`` (as on the head node under ``ray submit``), else a local Ray sized to this machine.

Under ``ray job submit`` Ray sets ``RAY_ADDRESS`` for the driver, so the same job runs unchanged on a
laptop and on a cluster.

An address is checked before Ray is asked to connect (Ray itself retries an unreachable GCS for about a
minute, then raises a traceback): an explicit address (``--address``, ``RAY_ADDRESS``) that does not answer
within ``CONNECT_TIMEOUT_S`` is a one-line ``CatdogError``; a cluster Ray merely *recorded* on this machine
(``ray_current_cluster`` in Ray's temp folder, left behind when a ``ray start`` cluster dies without
``ray stop``) that does not answer is skipped with a one-line warning, and a fresh local Ray is started.

Work over the feature store fans out by shards (``map_shards``), and one rule says how a shard reaches its task:
**a task reads its shard from the run directory when its node sees that file** (at the driver's path, of the
size and with the HDF5 signature the manifest records: ``shard_damage``); **a task on a node that does not is
answered with the shard file's bytes through Ray's object store** (read by the driver, which always sees the run
directory; a few shards ahead at most) and run again. Everything else a task needs (chosen features, NMF
components, the trained network) is small and travels as task arguments. Each result records its node and how the
shard was read (``file`` or ``object store``).
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import h5py
import ray

from catdog.errors import CatdogError
from catdog.progress import progress_bar
from catdog.store import ShardInfo, shard_damage

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = float(os.environ.get("CATDOG_RAY_CONNECT_TIMEOUT", "10"))
"""How long a Ray address may take to answer (TCP, then the gRPC handshake of Ray's GCS)."""


def recorded_cluster_file() -> str:
    """Where ``ray start`` records the last cluster started on this machine (``RAY_TMPDIR``, else
    ``TMPDIR``, else /tmp, then ``ray/ray_current_cluster``), as Ray itself looks it up."""
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(None)


def recorded_cluster() -> str | None:
    """The GCS address of the last ``ray start`` cluster on this machine, if Ray recorded one."""
    try:
        with open(recorded_cluster_file()) as handle:
            address = handle.read().strip()
    except OSError:
        return None
    return address or None


def _host_port(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def gcs_problem(address: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why ``address`` (host:port) is not a reachable Ray GCS, or None when it answers like one.

    A TCP connection, then an HTTP/2 (gRPC) handshake: a closed port, an unroutable host, and a port where
    something else listens (the dashboard's HTTP port, say) each fail within ``timeout`` seconds.
    """
    parsed = _host_port(address)
    if parsed is None:
        return "not a host:port address"
    host, port = parsed
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.settimeout(max(0.5, deadline - time.monotonic()))
            # the HTTP/2 client preface and an empty SETTINGS frame; a gRPC server answers with its SETTINGS
            conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            header = b""
            while len(header) < 9:
                chunk = conn.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
    except socket.timeout:
        return f"no answer within {timeout:.0f} s"
    except OSError as exc:
        return exc.strerror or str(exc)
    if len(header) < 9 or header[3] != 0x04:
        return "something answers there, but not Ray's GCS (gRPC); give the GCS address, HEAD_IP:6379"
    return None


def resolve_address(address: str | None = None) -> str:
    """The address to give ``ray.init``: checked explicit address, live recorded cluster, or ``"local"``."""
    explicit, source = (address, "--address") if address else (os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS")
    if explicit == "local":
        return "local"
    if explicit and explicit != "auto":
        if explicit.startswith(("http://", "https://")):
            raise CatdogError(f"{source}={explicit}: that is a dashboard (job submission) address; the job needs "
                              "the cluster's GCS address, HEAD_IP:6379 (or submit it with ray job submit "
                              f"--address {explicit} -- python jobs/...)")
        if explicit.startswith("ray://"):
            target = explicit[len("ray://"):]
            problem = _tcp_problem(target)
        else:
            target = explicit
            problem = gcs_problem(target)
        if problem:
            raise CatdogError(f"{source}={explicit}: cannot reach a Ray cluster there ({problem}); start the "
                              f"cluster (ray start --head) or fix the address, or unset {source} to run on a "
                              "local Ray")
        return explicit
    recorded = recorded_cluster()
    if recorded:
        problem = gcs_problem(recorded)
        if problem is None:
            return recorded
        log.warning("ignoring the dead Ray cluster recorded in %s (%s: %s); starting a local Ray",
                    recorded_cluster_file(), recorded, problem)
    elif explicit == "auto":
        raise CatdogError(f"{source}=auto: no Ray cluster was started on this machine (ray start --head); "
                          "give its address or unset it to run on a local Ray")
    return "local"


def _tcp_problem(address: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    parsed = _host_port(address)
    if parsed is None:
        return "not a host:port address"
    try:
        socket.create_connection(parsed, timeout=timeout).close()
    except socket.timeout:
        return f"no answer within {timeout:.0f} s"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Connect to (or start) Ray for the block; shut it down after, unless the caller had already initialised it
    (a notebook, a test), in which case that session is used as it is."""
    if ray.is_initialized():
        yield
        return
    target = resolve_address(address)
    saved = os.environ.pop("RAY_ADDRESS", None) if target == "local" else None
    try:
        ray.init(address=target, include_dashboard=False, log_to_driver=True)
    except (ConnectionError, ray.exceptions.RpcError, ray.exceptions.AuthenticationError, RuntimeError) as exc:
        raise CatdogError(f"Ray at {target}: cannot connect ({' '.join(str(exc).split())[:300]})") from None
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
    log.info("Ray at %s: %d node(s), %d CPU(s)", ray.get_runtime_context().gcs_address,
             len([n for n in ray.nodes() if n["Alive"]]), int(ray.cluster_resources().get("CPU", 0)))
    try:
        yield
    finally:
        ray.shutdown()


def node_name() -> str:
    """This process's node, as results record it: its IP address (the node id is in ``node_id()``)."""
    return ray.util.get_node_ip_address()


def node_id() -> str:
    return ray.get_runtime_context().get_node_id()


# ---------------------------------------------------------------------------------------------------- tasks

TASK_CPUS = 1
"""CPUs each task asks Ray for (``num_cpus``); its numpy and scikit-learn threads are held to it too, and Ray sets
``OMP_NUM_THREADS`` to it for torch."""


def _located(fn):
    """``fn`` with its threads held to ``TASK_CPUS``, returning its result and the node that computed it (IP address,
    Ray node id)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(TASK_CPUS):
            return fn(*args, **kwargs), (node_name(), node_id())
    return run


def remote_task(fn: Callable):
    """``fn`` (a module-level function) as a Ray task of ``TASK_CPUS`` CPUs whose result is ``(fn's result, (node,
    node id))``; rerun when its worker or node dies."""
    return ray.remote(num_cpus=TASK_CPUS, max_retries=3)(_located(fn))


@dataclass(frozen=True)
class ShardJob:
    """One task of a fan-out over shards: ``fn(shard, *args)``, ``shard`` the open ``h5py.File`` of ``info`` in the
    store at ``folder``. ``fn`` must be a module-level function (workers import it); ``args`` may be ObjectRefs."""

    folder: str
    info: ShardInfo
    fn: Callable
    args: tuple = ()

    @property
    def path(self) -> Path:
        return Path(self.folder) / self.info.file


def sees_shard(path: str | os.PathLike, info: ShardInfo) -> bool:
    """Whether this node sees the shard the manifest lists at ``path`` (there, its size and HDF5 signature)."""
    try:
        return Path(path).is_file() and shard_damage(path, info) is None
    except OSError:
        return False


def _run_shard(fn: Callable, path: str, info: ShardInfo, data: bytes | None, *args):
    """A shard task's body: ``(seen, result, where)``; ``seen`` is False (and nothing ran) when ``data`` is None and
    this node does not see ``path``."""
    from threadpoolctl import threadpool_limits

    where = {"node": node_name(), "node_id": node_id(), "read": "file" if data is None else "object store"}
    if data is None and not sees_shard(path, info):
        return False, None, where
    with threadpool_limits(TASK_CPUS), h5py.File(path if data is None else io.BytesIO(data), "r") as shard:
        return True, fn(shard, *args), where


def map_shards(jobs: list[ShardJob], desc: str, use_ray: bool = True,
               in_flight: int | None = None) -> Iterator[tuple[int, object, dict]]:
    """Run every job, yielding ``(job index, result, where)`` as each finishes (any order); ``where``: the shard's
    file and rows, the node (IP address and id) and how the shard was read (the module's rule).

    With ``use_ray`` each job is a Ray task of ``TASK_CPUS`` CPUs (a Ray session must be open), at most ``in_flight``
    at once (default: twice the cluster's CPUs), rerun when its worker or node dies; else they run here in turn."""
    with progress_bar(total=len(jobs), desc=desc, unit="shard") as bar:
        if not use_ray:
            for i, job in enumerate(jobs):
                with h5py.File(job.path, "r") as shard:
                    result = job.fn(shard, *job.args)
                bar.update()
                yield i, result, {"file": job.info.file, "rows": job.info.rows, "node": "local", "node_id": None,
                                  "read": "file"}
            return
        task = ray.remote(num_cpus=TASK_CPUS, max_retries=3)(_run_shard)
        in_flight = in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        queue, pending = deque((i, None) for i in range(len(jobs))), {}
        while queue or pending:
            while queue and len(pending) < in_flight:
                i, data = queue.popleft()
                job = jobs[i]
                pending[task.remote(job.fn, str(job.path), job.info, data, *job.args)] = i
            [done], _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done)
            seen, result, where = ray.get(done)
            if not seen:  # that node does not see the run directory: send the shard's bytes
                log.debug("%s: %s does not see %s; sending its bytes", desc, where["node"], jobs[i].path)
                queue.appendleft((i, ray.put(jobs[i].path.read_bytes())))
                continue
            bar.update()
            yield i, result, {"file": jobs[i].info.file, "rows": jobs[i].info.rows, **where}
