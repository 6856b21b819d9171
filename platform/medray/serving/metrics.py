"""Application metrics for operators, on Ray's Prometheus endpoint (`ray.serve.metrics`).

Inside Serve replicas these become `ray_medray_*` series next to Ray's own on every node's
metrics port (a local `medray serve` opens it at `ray.metrics_export_port`; a cluster at
`ray start --metrics-export-port`). Scrape them with Prometheus; serve/grafana-medray.json
is a dashboard over them. Outside a replica (the in-process backend of tests and
`bench/serve.py`'s baseline) nothing is exported, so every recorder call is skipped.

    medray_requests_total{endpoint, status}     requests answered, by route and HTTP status
    medray_request_latency_ms{endpoint}         time to answer (histogram)
    medray_embed_batch_size                     images per embedder forward (histogram)
    medray_model_version{model}                 version each deployment serves (gauge)
    medray_gallery_size{model}                  images the retriever searches (gauge)
"""

from __future__ import annotations

import functools
import logging
import sys
from functools import cache
from typing import Any

log = logging.getLogger("ray.serve")

REFRESH_S = 5.0
"""How often a replica sets its gauges again (Ray evicts a gauge not set for 2 report
intervals; the default interval is 10 s)."""
LATENCY_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]


def in_replica() -> bool:
    """True inside a Ray Serve replica (where ray.serve.metrics reach Prometheus)."""
    if "ray" not in sys.modules:
        return False
    try:
        from ray.serve.context import _get_internal_replica_context

        return _get_internal_replica_context() is not None
    except Exception:  # Ray moved it: no metrics rather than a broken request
        return False


@cache
def _metrics() -> dict[str, Any]:
    from ray.serve import metrics as m

    return {
        "requests": m.Counter("medray_requests_total", "Requests answered, by route and HTTP status.",
                              tag_keys=("endpoint", "status")),
        "latency": m.Histogram("medray_request_latency_ms", "Time to answer a request (ms).",
                               boundaries=LATENCY_MS, tag_keys=("endpoint",)),
        "batch": m.Histogram("medray_embed_batch_size", "Images per embedder forward pass.",
                             boundaries=BATCH_SIZES),
        # Serve adds `deployment`, `replica` and `application` tags to every series itself.
        "version": m.Gauge("medray_model_version", "Model version a deployment serves.",
                           tag_keys=("model",)),
        "gallery": m.Gauge("medray_gallery_size", "Images in the searched gallery.",
                           tag_keys=("model",)),
    }  # fmt: skip


def never_fails(fn):
    """A metric that cannot be recorded is logged, never the cause of a failed request."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:
            log.warning("medray metrics: %s failed", fn.__name__, exc_info=True)

    return wrapper


@never_fails
def request_done(endpoint: str, status: int, ms: float) -> None:
    if in_replica():
        _metrics()["requests"].inc(tags={"endpoint": endpoint, "status": str(status)})
        _metrics()["latency"].observe(ms, tags={"endpoint": endpoint})


@never_fails
def embed_batch(size: int) -> None:
    if in_replica():
        _metrics()["batch"].observe(size)


@never_fails
def serving(key: str, gallery_size: int | None = None) -> bool:
    """This replica's deployment serves bundle `key` (`name/version`); False when not
    recorded (not in a replica yet: Serve sets the replica context after reconfigure)."""
    if not in_replica():
        return False
    name, _, version = key.rpartition("/")
    if version.isdigit():
        _metrics()["version"].set(int(version), tags={"model": name})
    if gallery_size is not None:
        _metrics()["gallery"].set(gallery_size, tags={"model": name or key})
    return True
