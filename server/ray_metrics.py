"""A replica's `spectts_*` metrics into Ray's metrics export, with the replica in a label.

Each Ray node runs a metrics agent that Prometheus scrapes (a local cluster: `ray_metrics_port`;
KubeRay: port 8080 of every pod). It exports what `ray.util.metrics` record in that node's workers,
with Serve's own (`ray_serve_*`). This thread copies every sample of the replica's own
prometheus_client registry (the same one its `/metrics` route shows) into a Ray gauge of the same
name every `interval_s`; Serve adds the `deployment`, `replica` and `application` labels, and Ray
prefixes the name with `ray_`: `spectts_requests_total{route, status}` of a replica is
`ray_spectts_requests_total{route, status, replica, ...}` there. Counters and histogram buckets
become gauges holding the running totals: PromQL's rate() and histogram_quantile() read them alike.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry

log = logging.getLogger("spectts.ray_metrics")


class RayMetricsExport:
    def __init__(self, registry: CollectorRegistry, interval_s: float = 2.0) -> None:
        self.registry, self.interval_s = registry, interval_s
        self._gauges: dict[str, object] = {}  # sample name -> ray.serve.metrics.Gauge
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spectts-ray-metrics", daemon=True)
        self._thread.start()

    def copy(self) -> None:
        """Set one Ray gauge per sample name from the registry's current values."""
        from ray.serve.metrics import Gauge

        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # prometheus_client's creation timestamps
                    continue
                gauge = self._gauges.get(sample.name)
                if gauge is None:
                    gauge = Gauge(sample.name, description=family.documentation,
                                  tag_keys=tuple(sorted(sample.labels)))
                    self._gauges[sample.name] = gauge
                gauge.set(sample.value, tags=dict(sample.labels))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.copy()
            except Exception:  # noqa: BLE001 — metrics must never take the replica down
                log.exception("copying metrics to Ray failed")

    def stop(self) -> None:
        self._stop.set()
