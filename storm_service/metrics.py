"""Prometheus metrics for stormd (``--metrics-port``; needs the ``metrics`` extra).

Counters and histograms are updated by the serving loop as it works; pool and session
gauges are read from the server's state (its ``OpContext``) when Prometheus scrapes (the exporter runs on its own
thread, and reads only plain integers and C-level dict copies, which the GIL makes
atomic with respect to the loop). ``docs/operations.md`` lists every metric.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storm_service.ops import OpContext
    from storm_service.server import Server

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 50e-3, 0.25, 1.0)


class Metrics:
    """The daemon's metrics registry and its HTTP exporter."""

    def __init__(self, server: Server) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
        except ImportError as e:
            raise RuntimeError("--metrics-port needs prometheus-client: pip install 'storm-offload[metrics]'") from e
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "storm_request_seconds",
            "Time to serve one request, by op.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.offloaded = Counter(
            "storm_offloaded_bytes", "Bytes of activations committed (offloaded).", registry=self.registry
        )
        self.fetched = Counter("storm_fetched_bytes", "Bytes located by fetch.", registry=self.registry)
        self.registry.register(_ServerCollector(server.context))
        self._httpd: Any = None

    def serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._httpd, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd = None


class _ServerCollector:
    """Gauges and counters read from the server's state at scrape time."""

    def __init__(self, context: OpContext) -> None:
        self.context = context

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        context = self.context
        pool, sessions = context.pool, context.sessions
        for name, doc, value in (
            ("storm_pool_bytes", "Size of the host pool.", pool.size_bytes),
            ("storm_pool_used_bytes", "Bytes of committed activations held by sessions.", sessions.used_bytes),
            (
                "storm_pool_reserved_bytes",
                "Bytes allocated ahead of a copy and not yet committed (no activation yet).",
                sessions.reserved_bytes,
            ),
            ("storm_pool_free_bytes", "Free bytes in the pool.", pool.free_bytes),
            (
                "storm_pool_largest_free_bytes",
                "Largest free extent (shows fragmentation).",
                pool.largest_free_bytes,
            ),
            ("storm_sessions", "Live sessions.", len(sessions.sessions)),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        if sessions.tier is not None:
            yield from self._disk(sessions.tier.stats(), GaugeMetricFamily, CounterMetricFamily)
        if sessions.device is not None:
            yield from self._device(sessions.device.stats(), GaugeMetricFamily, CounterMetricFamily)
        held = GaugeMetricFamily(
            "storm_session_used_bytes",
            "Bytes of committed activations one session holds.",
            labels=["session", "pid", "rank", "name"],
        )
        for session in list(sessions.sessions.values()):
            rank = "" if session.rank is None else str(session.rank)
            held.add_metric([str(session.id), str(session.pid), rank, session.name], session.used_bytes)
        yield held
        requests = CounterMetricFamily("storm_requests", "Requests served, by op.", labels=["op"])
        for op, count in dict(context.requests).items():
            requests.add_metric([op], count)
        yield requests
        errors = CounterMetricFamily("storm_errors", "Error replies, by code.", labels=["code"])
        for code, count in dict(context.errors).items():
            errors.add_metric([code], count)
        yield errors
        yield CounterMetricFamily(
            "storm_expired_sessions",
            "Sessions expired for silence or a dead process.",
            value=sessions.expired_total,
        )

    @staticmethod
    def _device(stats: dict[str, Any], gauge: Any, counter: Any) -> Iterator[Any]:
        """The device tier (NOTE [Device tier] in storm_service/device/tier.py), in all and per device."""
        for name, doc, key in (
            ("storm_device_bytes", "Bytes the devices lend to the tier.", "device_bytes"),
            ("storm_device_used_bytes", "Bytes of activations on the devices.", "device_used_bytes"),
            ("storm_device_retired_bytes", "Device memory waiting for its importers to go.", "device_retired_bytes"),
        ):
            yield gauge(name, doc, value=stats[key])
        for name, doc, key in (
            ("storm_device_evicted_bytes", "Bytes moved from the devices to the host pool.", "device_evicted_bytes"),
            ("storm_device_evict_errors", "Moves off a device that failed.", "device_evict_errors"),
        ):
            yield counter(name, doc, value=stats[key])
        per_device = gauge("storm_device_used_bytes_by_device", "Bytes in use on one device.", labels=["device"])
        for device in stats["devices"]:
            per_device.add_metric([device["name"]], device["used_bytes"])
        yield per_device

    @staticmethod
    def _disk(stats: dict[str, Any], gauge: Any, counter: Any) -> Iterator[Any]:
        """The disk tier (NOTE [Disk tier] in storm_service/disk/tier.py)."""
        for name, doc, key in (
            ("storm_disk_bytes", "Bytes reserved in the spill files.", "disk_bytes"),
            ("storm_disk_used_bytes", "Bytes of activations on disk.", "disk_used_bytes"),
            ("storm_disk_spill_bytes_per_second", "Spill rate while spilling.", "spill_bytes_per_s"),
            ("storm_disk_restore_bytes_per_second", "Restore rate while restoring.", "restore_bytes_per_s"),
        ):
            yield gauge(name, doc, value=stats[key])
        for name, doc, key in (
            ("storm_disk_spilled_bytes", "Bytes written to the disk tier.", "spilled_total_bytes"),
            ("storm_disk_restored_bytes", "Bytes read back from the disk tier.", "restored_total_bytes"),
            ("storm_disk_restore_hits", "Extents read back before their fetch asked.", "restore_hits"),
            ("storm_disk_restore_waits", "Extents a fetch waited for.", "restore_waits"),
            ("storm_disk_spill_errors", "Writes to the disk tier that failed.", "spill_errors"),
            ("storm_disk_restore_errors", "Reads from the disk tier that failed.", "restore_errors"),
        ):
            yield counter(name, doc, value=stats[key])
