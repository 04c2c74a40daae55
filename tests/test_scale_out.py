"""`spectts serve --replicas 2` for real: a local Ray cluster started by the launcher, two Serve
replicas of the tiny random voice (0.5 CPU each, 1 torch thread), Serve's proxy on a random port.

Checked through the proxy: both replicas serve the same audio; bad input gets the single process's
exact 4xx bodies; WebSocket sessions; the replicas' metrics in Ray's Prometheus export with a
replica label; every replica full -> 503 JSON + Retry-After, and a WebSocket gets server_busy with
retry_after then a close; a killed replica ends its own streams at once while the other's complete,
and Serve restarts it; load adds a replica (autoscaling); SIGTERM leaves no Ray process behind.
Cost: one cluster for the module, about 1-2 minutes on 2 busy cores (marked `ray`).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import WebSocket

pytest.importorskip("ray.serve", reason="the `ray` extra is not installed (pip install -e .[ray])")
websockets = pytest.importorskip("websockets")
from test_server import BAD  # noqa: E402  (the server bar's bad inputs)

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
TEXT = "Replicas speak the same words."
LONG = "This sentence keeps a replica busy for a little while, long enough to stop it. " * 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, stack = {}, [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            try:
                found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ") \
                    .decode(errors="replace")
            except OSError:
                continue
            stack.append(child)
    return found


def alive(pid: int, cmdline: str) -> bool:
    try:
        now = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return now == cmdline  # the same process, not a reused pid


class Cluster:
    """The launcher process and every process it starts (seen every 0.5 s while it runs)."""

    def __init__(self, voice: Path) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_metrics_report_interval_ms": "1000"}
        env.pop("SPECTTS_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--replicas", "2", "--bundle", str(voice),
             "--decoding", "plain", "--threads", "1", "--max-batch", "4",
             "--replica-num-cpus", "0.5", "--min-replicas", "2", "--max-replicas", "3",
             "--target-ongoing", "2", "--port", str(self.port),
             "--ray-metrics-port", str(self.metrics_port), "--log-level", "warning"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)  # its own process group, as a terminal's foreground job
        self.seen: dict[int, str] = {}
        self.log: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._watch, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            if line.startswith("spectts: ready on"):
                self.ready.set()

    def _watch(self) -> None:
        while self.proc.poll() is None:
            self.seen.update(descendants(self.proc.pid))
            time.sleep(0.5)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("the cluster did not start:\n" + "".join(self.log[-40:]))

    def replica_pids(self) -> dict[int, str]:
        return {pid: cmd for pid, cmd in descendants(self.proc.pid).items()
                if "ServeReplica:spectts:SpecTTS" in cmd}  # its title while loading too

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60, group: bool = False) -> int:
        """Signal the launcher (`group`: its whole process group, as Ctrl-C in a terminal)."""
        if self.proc.poll() is None:
            self.seen.update(descendants(self.proc.pid))
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid, cmd in {self.proc.pid: "", **self.seen}.items():  # never leave them behind
                if pid == self.proc.pid or alive(pid, cmd):
                    os.kill(pid, signal.SIGKILL)
            raise


def in_group(pgid: int) -> dict[int, str]:
    """pid -> command line of every process in process group `pgid`: the launcher's group holds
    Ray's processes too, even those whose parent has exited (they keep their group)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                    found[int(entry)] = Path(f"/proc/{entry}/cmdline").read_bytes() \
                        .replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError):
                continue
    return found


def gone(seen: dict[int, str], pgid: int) -> None:
    """Every Ray process seen below the launcher, and every process of its group, has ended."""
    names = sorted({cmd.split()[0].rsplit("/", 1)[-1] for cmd in seen.values() if cmd})
    assert any(n.startswith("ray::") for n in names), names  # the cluster was seen running
    time.sleep(1)
    left = {pid: cmd for pid, cmd in seen.items() if alive(pid, cmd)}
    left.update({pid: cmd for pid, cmd in in_group(pgid).items() if cmd})
    assert not left, left


def test_ctrl_c_while_replicas_load_stops_every_ray_process(tiny_voice):
    """Ctrl-C in a terminal: SIGINT to the launcher's whole process group, Ray's processes too."""
    c = Cluster(tiny_voice)
    try:
        deadline = time.monotonic() + 120
        while not c.replica_pids():  # the cluster is up and the replicas are loading
            assert c.proc.poll() is None and time.monotonic() < deadline, "".join(c.log)
            time.sleep(0.5)
        c.seen.update(descendants(c.proc.pid))
        assert c.stop(signal.SIGINT, group=True) == 0, "".join(c.log[-20:])
        gone(c.seen, c.proc.pid)
    finally:
        c.stop(signal.SIGKILL, group=True)


@pytest.fixture(scope="module")
def cluster(tiny_voice):
    c = Cluster(tiny_voice)
    try:
        c.wait_ready(240)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def single(tiny_voice):
    """The single-process app on the same voice: the reference for error bodies."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings

    with TestClient(create_app(Settings(bundle=tiny_voice, decoding="plain", threads=1,
                                        max_batch=4))) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        yield client


def pcm(wav_bytes: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(wav_bytes)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.int32)


def speak(http: httpx.Client, text: str = TEXT) -> tuple[str, bytes]:
    r = http.post("/v1/audio/speech", json={"input": text, "response_format": "wav"})
    assert r.status_code == 200, r.text
    return r.headers["x-spectts-replica"], r.content


def test_both_replicas_serve_the_same_audio(http):
    served: dict[str, bytes] = {}
    for _ in range(12):
        replica, audio = speak(http)
        served.setdefault(replica, audio)
        if len(served) == 2:
            break
    assert len(served) == 2, "Serve's router sent every request to one replica"
    first, second = (pcm(audio) for audio in served.values())
    assert len(first) > 0.2 * 22050
    # greedy decoding of one voice: the replicas agree sample for sample, to the streaming
    # vocoder's float rounding (a PCM16 step, as two runs of one process)
    assert len(first) == len(second) and np.abs(first - second).max() <= 1


def test_bad_input_is_the_single_process_answer(http, single):
    for body, _ in BAD:
        ours, reference = http.post("/v1/audio/speech", json=body), \
            single.post("/v1/audio/speech", json=body)
        assert (ours.status_code, ours.json()) == (reference.status_code, reference.json()), body
    for content in (b"{not json", b"[1, 2]", b""):
        ours = http.post("/v1/audio/speech", content=content,
                         headers={"content-type": "application/json"})
        reference = single.post("/v1/audio/speech", content=content,
                                headers={"content-type": "application/json"})
        assert (ours.status_code, ours.json()) == (reference.status_code, reference.json())
    for path in ("/v1/nothing", "/v1/audio/speech"):
        assert http.get(path).json() == single.get(path).json()
    assert http.get("/health").json() == {"status": "ok"}


async def ws_session(url: str, text: str = TEXT, timeout: float = 60) -> dict:
    """One WebSocket session; what came back. Never waits longer than `timeout`."""
    out = {"audio": 0, "events": [], "close": None, "replica": None}

    async def run():
        async with websockets.connect(url, max_size=None, open_timeout=timeout) as ws:
            out["replica"] = ws.response.headers.get("x-spectts-replica")
            try:
                await ws.send(json.dumps({"type": "session.config", "response_format": "pcm"}))
                await ws.send(json.dumps({"type": "input.text", "text": text}))
                await ws.send(json.dumps({"type": "input.done"}))
                while True:
                    message = await ws.recv()
                    if isinstance(message, bytes):
                        out["audio"] += len(message)
                        continue
                    event = json.loads(message)
                    out["events"].append(event)
                    if event["type"] == "session.done":
                        return
            except websockets.ConnectionClosed as exc:
                out["close"] = exc.rcvd.code if exc.rcvd else None

    await asyncio.wait_for(run(), timeout)
    out["ended"] = time.monotonic()
    return out


def ws_url(cluster) -> str:
    return cluster.url.replace("http", "ws") + "/v1/audio/speech/stream"


def test_websocket_sessions_and_bad_messages_through_the_proxy(cluster, http):
    session = asyncio.run(ws_session(ws_url(cluster)))
    assert session["events"][-1]["status"] == "completed"
    _, wav = speak(http)
    assert session["audio"] == len(pcm(wav)) * 2  # as much audio as over HTTP

    async def bad():
        async with websockets.connect(ws_url(cluster)) as ws:
            await ws.send("{not json")
            first = json.loads(await asyncio.wait_for(ws.recv(), 30))
            await ws.send(json.dumps({"type": "input.text", "text": "Hi."}))
            second = json.loads(await asyncio.wait_for(ws.recv(), 30))
            return first, second

    first, second = asyncio.run(bad())
    assert first["error"]["code"] == "invalid_json" and second["error"]["code"] == "no_session_config"


def test_replica_metrics_in_rays_export_with_a_replica_label(cluster, http):
    replicas = {speak(http)[0] for _ in range(6)}
    deadline, found = time.monotonic() + 45, set()
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10).text
        found = set(re.findall(r'^ray_spectts_requests_total\{[^}]*replica="([^"]+)"', text, re.M))
        if replicas <= found and "ray_serve_num_http_requests" in text:
            break
        time.sleep(1)
    assert replicas <= found, (replicas, found)
    assert re.search(r'^ray_spectts_time_to_first_audio_seconds_bucket\{[^}]*le="', text, re.M)
    assert "ray_serve_num_http_requests" in text  # Serve's own metrics, in the same export


def test_every_replica_full_gets_503_and_websocket_gets_server_busy_then_close(cluster, http):
    """Idle sockets hold Serve slots (max_ongoing_requests per replica) without load. Open them one
    by one (each admitted, queued in Serve's router, or refused) until the proxy refuses one; then
    an HTTP request is refused too."""
    async def attempt():
        ws = await websockets.connect(ws_url(cluster), open_timeout=120)
        try:
            message = await asyncio.wait_for(ws.recv(), 1.0)
        except asyncio.TimeoutError:
            return "held", None, ws  # accepted by a replica: it holds a slot
        except websockets.ConnectionClosed:
            message = None
        await asyncio.wait_for(ws.wait_closed(), 10)  # never a hang: closed right after
        return "refused", message, ws

    async def run():
        tasks, refused = [], None
        for _ in range(60):
            tasks.append(asyncio.create_task(attempt()))
            await asyncio.wait([tasks[-1]], timeout=1.5)  # still pending: queued in the router
            refused = next((t.result() for t in tasks if t.done() and t.result()[0] == "refused"),
                           None)
            if refused:
                break
        answer = await asyncio.to_thread(http.post, "/v1/audio/speech", json={"input": TEXT})
        for task in tasks:  # hang up; the queued ones are admitted, then hung up too
            if task.done():
                await task.result()[2].close()
        for kind, _, ws in await asyncio.wait_for(asyncio.gather(*tasks), 60):
            await ws.close()
        return refused, answer, sum(t.result()[0] == "held" for t in tasks)

    refused, answer, held = asyncio.run(run())
    assert refused is not None, "60 sockets were all admitted"
    _, message, ws = refused
    event = json.loads(message)
    assert event["type"] == "error" and event["error"]["code"] == "server_busy"
    assert event["retry_after"] >= 1 and ws.close_code == 1013
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "server_busy"
    assert int(answer.headers["retry-after"]) >= 1
    assert held >= 4
    deadline = time.monotonic() + 30  # slots free again
    while (r := http.post("/v1/audio/speech", json={"input": TEXT})).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.5)


def test_replica_edge_closes_a_socket_refused_at_capacity():
    """A replica's own refusal (its capacity model) on a socket is followed by close 1013."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from server.scale_out import ReplicaEdge

    app, after = FastAPI(), []

    @app.websocket("/ws")
    async def refuse(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_json({"type": "error", "error": {"code": "server_busy"}, "retry_after": 1})
        after.append(await ws.receive())  # the app learns that the socket is closed

    with TestClient(ReplicaEdge(app, "r1")).websocket_connect("/ws") as ws:
        assert json.loads(ws.receive_text())["error"]["code"] == "server_busy"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert closed.value.code == 1013 and after[0]["type"] == "websocket.disconnect"


def stream_long(url: str, out: dict, key: int) -> None:
    """A streamed PCM request of LONG; out[key] = (replica, ok, bytes, seconds after the kill)."""
    replica, received = None, 0
    try:
        with httpx.stream("POST", url + "/v1/audio/speech", timeout=60,
                          json={"input": LONG, "stream": True, "response_format": "pcm"}) as r:
            replica = r.headers.get("x-spectts-replica")
            out[key] = (replica, None, 0, None)
            for chunk in r.iter_bytes():
                received += len(chunk)
            ok = r.status_code == 200  # not Ray's own 500 for a request its replica never answered
        out[key] = (replica, ok, received, time.monotonic())
    except httpx.HTTPError:
        out[key] = (replica, False, received, time.monotonic())


def test_killed_replica_ends_its_streams_others_complete_and_serve_restarts_it(cluster, http):
    before = cluster.replica_pids()
    out: dict[int, tuple] = {}
    sockets: dict[int, dict] = {}

    def socket_long(i: int) -> None:
        sockets[i] = asyncio.run(ws_session(ws_url(cluster), LONG, timeout=60))

    threads = [threading.Thread(target=stream_long, args=(cluster.url, out, i)) for i in range(4)]
    threads += [threading.Thread(target=socket_long, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    deadline = time.monotonic() + 60
    while len({v[0] for v in out.values() if v[0]}) < 2:  # streams running on both replicas
        assert time.monotonic() < deadline, out
        time.sleep(0.05)
    victim = next(iter(before))
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    # a request still in flight to the victim, unanswered, gets Ray's own 500 (no replica): a
    # failure the client sees, but of no replica
    failed = {v[0] for v in out.values() if not v[1] and v[0]}
    # a stream that completed before the kill says nothing about failover (the tiny voice is fast)
    completed = {v[0] for v in out.values() if v[1] and v[3] > killed_at}
    assert len(failed) == 1 and not failed & completed, out  # only the killed replica's streams
    assert all(v[3] - killed_at < 10 for v in out.values() if not v[1]), out  # ended at once
    full = {v[2] for v in out.values() if v[1]}
    assert len(full) == 1 and full.pop() > max(v[2] for v in out.values() if not v[1])
    for session in sockets.values():  # WebSockets: an error message and close 1011, or complete
        if session["ended"] < killed_at:
            continue  # done before the kill
        if session["replica"] in failed:
            assert session["events"][-1]["error"]["code"] == "replica_failed", session["events"]
            assert session["close"] == 1011
        elif session["replica"] in completed:
            assert session["events"][-1]["status"] == "completed"

    deadline = time.monotonic() + 30  # healthy again within 30 s
    while True:
        try:
            if http.post("/v1/audio/speech", json={"input": TEXT}).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.5)
    deadline = time.monotonic() + 120  # and Serve replaces the killed replica
    while len(cluster.replica_pids()) < len(before) or victim in cluster.replica_pids():
        assert time.monotonic() < deadline
        time.sleep(1)


def test_load_adds_a_replica(cluster):
    """target_ongoing 2 per replica, min 2, max 3: held sockets past 2 each bring a third."""
    async def run():
        sockets, replicas = [], set()
        deadline = time.monotonic() + 150
        while len(replicas) < 3 and time.monotonic() < deadline:
            if len(sockets) < 8:
                try:
                    ws = await websockets.connect(ws_url(cluster), open_timeout=2)
                    sockets.append(ws)
                    replicas.add(ws.response.headers["x-spectts-replica"])
                except (TimeoutError, asyncio.TimeoutError, websockets.InvalidHandshake):
                    pass
            else:  # cycle one socket: a new connection goes to the least loaded replica
                await sockets.pop(0).close()
            await asyncio.sleep(0.5)
        for ws in sockets:
            await ws.close()
        return replicas

    assert len(asyncio.run(run())) == 3


def test_sigterm_stops_every_ray_process(cluster):
    started = time.monotonic()
    assert cluster.stop(signal.SIGTERM) == 0, "".join(cluster.log[-20:])
    assert time.monotonic() - started < 60
    gone(cluster.seen, cluster.proc.pid)
