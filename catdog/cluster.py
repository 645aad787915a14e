"""Where Ray work runs: the cluster at ``--address`` or ``RAY_ADDRESS``, else a cluster started on this machine
with ``ray start`` (as on the head node under ``ray submit``), else a local Ray sized to this machine.

Under ``ray job submit`` Ray sets ``RAY_ADDRESS`` for the driver, so the same job runs unchanged on a
laptop and on a cluster.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import ray

log = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[None]:
    """Connect to (or start) Ray for the block; shut it down after, unless the caller had already initialised it
    (a notebook, a test), in which case that session is used as it is."""
    if ray.is_initialized():
        yield
        return
    ray.init(address=address, include_dashboard=False)
    log.info("Ray at %s: %d node(s), %d CPU(s)", ray.get_runtime_context().gcs_address,
             len(ray.nodes()), int(ray.cluster_resources().get("CPU", 0)))
    try:
        yield
    finally:
        ray.shutdown()
