"""`spectts serve --replicas N` (or --max-replicas, --ray-address): the server on Ray Serve.

Without --ray-address it starts a local Ray cluster (its GCS, raylet and workers are this process's
children), deploys N replicas behind Serve's proxy on --host:--port, and on exit (Ctrl-C, SIGTERM)
stops Serve and the whole cluster. With --ray-address it deploys the application to that cluster
and on exit deletes the application, leaving the cluster running.

Deployment runs in two steps when --replica-max-ongoing is not given: the replicas come up with the
engine's batch as their bound, then the launcher asks one replica for its measured capacity and
redeploys the same version with max_ongoing_requests (and the autoscaling target) from it, which
Serve applies to the running replicas without restarting them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from server.settings import Settings

PROXY_CALLBACK = "server.serve_proxy:middlewares"
log = logging.getLogger("spectts.scale_out")


def ray_environment(settings: Settings) -> None:
    """Environment the local cluster's processes inherit: no usage reporting, the proxy's error
    middleware, and this process's import path (so workers run this tree's code)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    os.environ.setdefault("RAY_metrics_report_interval_ms", "5000")
    if settings.api_key is not None:  # replicas read it from their environment
        os.environ["SPECTTS_API_KEY"] = settings.api_key.get_secret_value()


def start_ray(settings: Settings) -> bool:
    """Connect to --ray-address or start a local cluster; True when the cluster is ours."""
    import ray

    ray_environment(settings)
    if settings.ray_address:
        ray.init(address=settings.ray_address, logging_level=logging.WARNING,
                 log_to_driver=False)
        return False
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             _metrics_export_port=settings.ray_metrics_port)
    return True


def deploy(settings: Settings, timeout_s: float = 600.0) -> int | None:
    """Deploy the Serve config and wait until it runs; returns the capacity it was sized with
    (None: --replica-max-ongoing given)."""
    from ray import serve
    from ray.serve.context import _get_global_client  # what `serve deploy` / `serve run` use
    from ray.serve.schema import ServeDeploySchema

    from server.scale_out import APP_NAME, DEPLOYMENT_NAME, serve_config

    def apply(capacity: int | None) -> None:
        config = ServeDeploySchema.model_validate(serve_config(settings, capacity))
        _get_global_client().deploy_apps(config)
        deadline = time.monotonic() + timeout_s
        while (app := serve.status().applications.get(APP_NAME)) is None \
                or app.status != "RUNNING":
            if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"deploying {APP_NAME} failed: {app.message}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{APP_NAME} did not start within {timeout_s:g} s")
            time.sleep(0.5)

    serve.start(http_options={"host": settings.host, "port": settings.port},
                logging_config={"log_level": settings.log_level.upper()})
    apply(None)
    if settings.replica_max_ongoing is not None:
        return None
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    capacity = handle.capacity.remote().result(timeout_s=60)
    if capacity is not None:
        apply(capacity)  # the same code and args: Serve reconfigures the running replicas
    return capacity


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def serve_on_ray(settings: Settings) -> int:
    """Run until SIGINT / SIGTERM (also while starting), then stop what this process started."""
    import ray
    from ray import serve

    from server.scale_out import APP_NAME, deployment_options

    # Ctrl-C reaches the terminal's whole process group: the cluster's processes start with SIGINT
    # ignored (inherited), so that only this process hears it and stops them in order (a raylet
    # killed by it leaves its agents running)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _interrupt)
    own = None
    try:
        own = start_ray(settings)
        for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which chains a handler of
            signal.signal(sig, _interrupt)            # its own in that aborts after ours
        capacity = deploy(settings)
        options = deployment_options(settings, capacity)
        scaling = options.get("autoscaling_config")
        count = (f"{scaling['min_replicas']}-{scaling['max_replicas']}" if scaling
                 else options["num_replicas"])
        print(f"spectts: ready on http://{settings.host}:{settings.port} ({count} replicas, "
              f"capacity {capacity} streams each, max_ongoing_requests "
              f"{options['max_ongoing_requests']})", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the cleanup
            signal.signal(sig, signal.SIG_IGN)
        log.info("stopping")
        try:
            if own:
                serve.shutdown()
            elif own is False:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
    return 0
