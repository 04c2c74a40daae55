"""SpecTTS on Ray Serve: the deployment (one replica = today's app with its own engine) and its options.

A replica is `create_app(settings)` with every served model (`settings.models`, or the one
`bundle`) loaded, calibrated and started, each its own `TTSService`: the same routes, errors and
per-model admission control as the single process. The constructor returns only once every voice is
loaded and warmed up, so Serve sends a replica no traffic before it can speak.

Routing and admission across replicas are Serve's: its router sends each request (a WebSocket: its
whole connection) to the less loaded of two replicas, never more than `max_ongoing_requests` to one;
beyond that requests wait in the router (`max_queued_requests`) and then get 503 + Retry-After
(`backpressure_config`; `server.serve_proxy` turns it into the API's JSON error, or the WebSocket's
`server_busy` message). `deployment_options` derives those numbers from a replica's measured capacity.

`build_app(args)` is the import path for a Serve config file (`serve build`, KubeRay's RayService):
`args` are Settings fields.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ray import serve

from server.settings import Settings

APP_NAME = "spectts"
DEPLOYMENT_NAME = "SpecTTS"
IMPORT_PATH = "server.scale_out:build_app"
# Settings that only the launcher uses; a replica never reads them
LAUNCHER_FIELDS = frozenset({"host", "port", "replicas", "ray_address", "replica_num_cpus",
                             "replica_num_gpus", "replica_max_ongoing", "replica_max_queued",
                             "min_replicas", "max_replicas", "target_ongoing", "ray_metrics_port"})
# autoscaling aims at this share of a replica's capacity, so a new replica is up before all are full
TARGET_SHARE = 0.5
log = logging.getLogger("spectts.scale_out")


def replica_args(settings: Settings) -> dict[str, Any]:
    """The fields a replica is built from: those set explicitly (flags or SPECTTS_* of the
    launcher), as JSON. Never the API key: a Serve config is stored in the cluster in plain text; a
    replica reads SPECTTS_API_KEY from its environment (the launcher's, or the RayService's
    Secret)."""
    args = settings.model_dump(mode="json", exclude_unset=True,
                               exclude={*LAUNCHER_FIELDS, "api_key"})
    return args


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class SpecTTSReplica:
    """One replica: every served model loaded with its engine thread, the FastAPI app."""

    def __init__(self, args: dict[str, Any]) -> None:
        from server.app import create_app, load_models
        from server.ray_metrics import RayMetricsExport

        settings = Settings(**args)
        logging.basicConfig(level=settings.log_level.upper())
        self.api = create_app(settings)
        state = self.api.state.spectts
        load_models(state)  # blocks until warmed up: no traffic before; stopped at shutdown
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.export = RayMetricsExport(state.metrics.registry)

    def __serve_build_asgi_app__(self):
        return ReplicaEdge(self.api, self.replica)

    def capacity(self) -> int | None:
        """Streams this replica keeps ahead of real time (`Capacity.streams`): the sum over its
        models, each of which still admits only its own share; None if one is unknown."""
        streams = [s.capacity.streams() for s in self.api.state.spectts.services().values()]
        return None if None in streams else sum(streams)

    def __del__(self) -> None:
        if getattr(self, "export", None) is not None:
            self.export.stop()


class ReplicaEdge:
    """ASGI middleware around a replica's app. Every HTTP response and WebSocket handshake says
    which replica served it (X-SpecTTS-Replica). A WebSocket session refused at capacity
    (`server_busy`) is followed by a close (1013, try again later): on Serve an open socket holds a
    slot of a full replica, and a client that reconnects goes to the least loaded one."""

    def __init__(self, app, replica: str) -> None:
        self.app, self.header = app, (b"x-spectts-replica", replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        closed = False  # a WebSocket this middleware has closed after server_busy

        async def edge_send(message) -> None:
            nonlocal closed
            if closed:
                return  # the app learns on its next receive
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)
            text = message.get("text") if message["type"] == "websocket.send" else None
            if text and '"server_busy"' in text and json.loads(text).get("type") == "error":
                closed = True
                await send({"type": "websocket.close", "code": 1013, "reason": "server busy"})

        async def edge_receive():
            if closed:
                return {"type": "websocket.disconnect", "code": 1013}
            return await receive()

        await self.app(scope, edge_receive, edge_send)


def deployment_options(settings: Settings, capacity: int | None) -> dict[str, Any]:
    """Serve's options for the deployment. `capacity`: a replica's measured streams ahead of real
    time (None before one is measured: the engines' batches are the bound, one per model)."""
    batches = settings.max_batch * len(settings.registry().models)
    max_ongoing = settings.replica_max_ongoing or (capacity + 1 if capacity else batches)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.replica_num_cpus,
                              "num_gpus": settings.replica_num_gpus},
        # + 1 over the capacity: a probe or a metrics scrape still gets through to a full replica
        # (its own admission control refuses a stream beyond the capacity with server_busy)
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": settings.replica_max_queued,
        "backpressure_config": {"status_code": 503, "retry_after_s": settings.retry_after_s},
        # a stopped replica lets its streams finish for this long, then ends them
        "graceful_shutdown_timeout_s": 10.0,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 20.0,
    }
    if settings.max_replicas:
        target = settings.target_ongoing or max(1.0, TARGET_SHARE * (capacity or max_ongoing))
        options["autoscaling_config"] = {
            "min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
            "initial_replicas": max(settings.min_replicas,
                                    min(settings.replicas, settings.max_replicas)),
            "target_ongoing_requests": target,
            "upscale_delay_s": 3.0, "downscale_delay_s": 60.0}
    else:
        options["num_replicas"] = settings.replicas
    return options


def serve_config(settings: Settings, capacity: int | None = None) -> dict[str, Any]:
    """A Serve config (`ServeDeploySchema`) for these settings: what the launcher deploys and what
    a RayService carries. Redeployed with the same args and other deployment options, Serve
    reconfigures the running replicas instead of restarting them."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": settings.host, "port": settings.port},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
            "args": replica_args(settings),
            "deployments": [{"name": DEPLOYMENT_NAME, **deployment_options(settings, capacity)}],
        }],
    }


def build_app(args: dict[str, Any]):
    """The application a Serve config names (`server.scale_out:build_app`); `args`: Settings
    fields for the replicas. Replica count, resources and admission come from the config's
    `deployments` entry (`serve_config` writes them)."""
    return SpecTTSReplica.bind(replica_args(Settings(**args)))
