"""Prometheus metrics (prefix spectts_, units in names), one CollectorRegistry per app.

Updated from the service's events: every finished sentence ("sentence_done" stats) adds its tokens,
target forwards and drafted / accepted counts; every finished request ("done") observes its time to
first audio and real-time factor. Gauges read the services when scraped.

Counters and gauges carry a `model` label (the served model's name: `server.model_registry`; "" on a
request refused before a model was chosen); histograms are over all models.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: N811, F401
from prometheus_client.core import GaugeMetricFamily

from engine.serving.service import TTSService
from engine.serving.stream import Event, EventKind

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_UNDERRUN_BUCKETS = (0.0, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0)
_LENGTH_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)


# gauges read from each model's service when scraped: name, help, how to read it
_SERVICE_GAUGES = (
    ("spectts_requests_waiting", "Requests waiting for a decoding slot", lambda s: s.waiting),
    ("spectts_requests_running", "Requests holding a decoding slot (at most the engine's max "
     "batch; vLLM's num_requests_running)", lambda s: s.active),
    ("spectts_kv_cache_slots_in_use", "KV cache slots held by sequences; utilisation: "
     "spectts_kv_cache_slots_in_use / spectts_kv_cache_slots",
     lambda s: s.tts.engine.cache.slots_in_use),
    ("spectts_kv_cache_slots", "KV cache slots (the engine's max batch)",
     lambda s: s.tts.engine.cache.max_batch),
)


class _ServiceGauges:
    """A collector: the `_SERVICE_GAUGES` of every loaded model, labelled by model."""

    def __init__(self, services: Callable[[], dict[str, TTSService]]) -> None:
        self.services = services

    def describe(self) -> list:
        return []  # nothing to read at registration (no model has loaded yet)

    def collect(self):
        services = self.services()
        for name, documentation, read in _SERVICE_GAUGES:
            family = GaugeMetricFamily(name, documentation, labels=["model"])
            for model, service in services.items():
                family.add_metric([model], float(read(service)))
            yield family


class Metrics:
    def __init__(self, services: Callable[[], dict[str, TTSService]]) -> None:
        """`services` returns the loaded models' services by model name."""
        self.registry = r = CollectorRegistry()
        r.register(_ServiceGauges(services))
        self.requests = Counter(
            "spectts_requests", "Requests by route, HTTP status and model (WebSocket sessions: 200 "
            "done, 400 refused, 499 cancelled by the client, 500 failed, 503 at capacity). Error "
            "ratio: sum(rate(spectts_requests_total{status=~\"5..\"}[5m])) / "
            "sum(rate(spectts_requests_total[5m]))", ["route", "status", "model"], registry=r)
        self.ttfa = Histogram("spectts_time_to_first_audio_seconds",
                              "Time from accepting a request to its first audio chunk (queue wait included)",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("spectts_queue_wait_seconds",
                                    "Time a request waited in the admission queue for a stream "
                                    "(0 when one was free; refused ones after max_queue_wait_s)",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("spectts_request_duration_seconds",
                                  "Time to serve a request, until its last byte",
                                  ["route"], buckets=_DURATION_BUCKETS, registry=r)
        self.rtf = Histogram("spectts_real_time_factor_ratio",
                             "Wall time / audio duration per request (< 1: faster than real time)",
                             buckets=_RTF_BUCKETS, registry=r)
        self.audio = Counter("spectts_audio_seconds", "Seconds of audio generated", ["model"],
                             registry=r)
        self.underrun = Histogram(
            "spectts_audio_underrun_seconds", "Per request, the longest playback stall of a listener "
            "whose player starts at the first audio chunk and plays continuously (0: never waited; "
            "silence while a streaming client sends no text does not count)",
            buckets=_UNDERRUN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("spectts_prompt_tokens", "Prompt tokens of every sentence "
                                     "(prefix cache hit ratio: rate(spectts_prefix_cache_hit_tokens"
                                     "_total[5m]) / rate(spectts_prompt_tokens_total[5m]))",
                                     ["model"], registry=r)
        self.prefix_hits = Counter("spectts_prefix_cache_hit_tokens",
                                   "Prompt tokens reused from the prefix cache, not computed",
                                   ["model"], registry=r)
        self.tokens = Counter("spectts_generated_tokens",
                              "Speech-LM tokens generated (forced phoneme tokens included). Mean "
                              "accepted length: rate(spectts_generated_tokens_total[5m]) / "
                              "rate(spectts_target_forwards_total[5m])", ["model"], registry=r)
        self.forwards = Counter("spectts_target_forwards",
                                "Target model forwards (prefill included)", ["model"],
                                registry=r)
        self.drafted = Counter("spectts_spec_decode_num_draft_tokens",
                               "Draft tokens proposed (forced tokens excluded). Acceptance rate: "
                               "rate(spectts_spec_decode_num_accepted_tokens_total[5m]) / "
                               "rate(spectts_spec_decode_num_draft_tokens_total[5m])",
                               ["model"], registry=r)
        self.accepted = Counter("spectts_spec_decode_num_accepted_tokens",
                                "Draft tokens accepted by verification", ["model"],
                                registry=r)
        self.accepted_pos = Counter(
            "spectts_spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by depth (position 0: the first drafted token). Acceptance at a "
            "position: rate(spectts_spec_decode_num_accepted_tokens_per_pos_total{position=\"k\"}[5m])"
            " / rate(spectts_spec_decode_num_draft_tokens_per_pos_total{position=\"k\"}[5m])",
            ["position", "model"], registry=r)
        self.drafted_pos = Counter("spectts_spec_decode_num_draft_tokens_per_pos",
                                   "Draft tokens proposed by depth (position 0: the first)",
                                   ["position", "model"], registry=r)
        self.accepted_length = Histogram(
            "spectts_accepted_length_tokens", "Mean tokens per target forward, one observation per "
            "sentence (bonus and forced tokens included: above 1 under a voice's rule even in plain "
            "decoding)",
            buckets=_LENGTH_BUCKETS, registry=r)

    def add_model(self, model: str) -> None:
        """Start the model's counters at 0 (rate() sees its first increase)."""
        for counter in (self.audio, self.prompt_tokens, self.prefix_hits, self.tokens,
                        self.forwards, self.drafted, self.accepted):
            counter.labels(model)

    def observe(self, event: Event, model: str) -> None:
        """Count what one service event of `model` tells."""
        stats = event.stats or {}
        if event.kind == EventKind.SENTENCE_DONE:
            self.tokens.labels(model).inc(stats.get("tokens", 0))
            self.forwards.labels(model).inc(stats.get("target_forwards", 0))
            self.drafted.labels(model).inc(stats.get("drafted", 0))
            self.accepted.labels(model).inc(stats.get("accepted", 0))
            self.prompt_tokens.labels(model).inc(stats.get("prompt_tokens", 0))
            self.prefix_hits.labels(model).inc(stats.get("cached_prompt_tokens", 0))
            for pos, n in enumerate(stats.get("accepted_per_pos", [])):
                self.accepted_pos.labels(str(pos), model).inc(n)
            for pos, n in enumerate(stats.get("drafted_per_pos", [])):
                self.drafted_pos.labels(str(pos), model).inc(n)
            if stats.get("target_forwards"):
                self.accepted_length.observe(stats["mean_accepted_length"])
        if event.kind in (EventKind.DONE, EventKind.CANCELLED, EventKind.REFUSED):
            if stats.get("queue_wait_seconds") is not None:
                self.queue_wait.observe(stats["queue_wait_seconds"])
        if event.kind in (EventKind.DONE, EventKind.CANCELLED):
            if stats.get("audio_seconds"):
                self.audio.labels(model).inc(stats["audio_seconds"])
            if stats.get("time_to_first_audio_seconds") is not None:
                self.ttfa.observe(stats["time_to_first_audio_seconds"])
                self.underrun.observe(stats.get("max_underrun_seconds", 0.0))
            if event.kind == EventKind.DONE and stats.get("real_time_factor") is not None:
                self.rtf.observe(stats["real_time_factor"])

    def request(self, route: str, status: int, seconds: float, model: str = "") -> None:
        """One finished request; model "": refused before a model was chosen (or none needed)."""
        self.requests.labels(route, str(status), model).inc()
        self.duration.labels(route).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
