"""Soak: many requests with random cancels and disconnects against a real server process; nothing may
fail that was not cancelled, no KV slot may leak, resident memory must stay flat after warm-up.

    .venv/bin/python -m bench.soak [--requests 1000] [--concurrency 8] [--threads 1]

Each request is one of: an HTTP file (POST /v1/audio/speech), an HTTP stream that the client drops
after its first bytes, a WebSocket session spoken to the end, a WebSocket session cancelled with
{"type": "cancel"} after its first audio, a WebSocket dropped mid-stream. A 503 (admission control)
is not a failure: the client waits Retry-After and sends the request again (counted). At the end the server must report no running or waiting request
and no KV slot in use (GET /metrics); the server's VmRSS is read after the first tenth of the
requests and at the end. Writes bench/results/soak.json; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from bench.load import serve
from models.recipes.corpus import load_eval_sentences

KINDS = ("http_file", "http_dropped", "ws_done", "ws_cancel", "ws_dropped")
WEIGHTS = (0.3, 0.15, 0.3, 0.15, 0.1)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def gauges(base: str) -> dict[str, float]:
    """The server's load gauges, summed over its models (label `model`)."""
    out = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        series, _, value = line.rpartition(" ")
        name = series.partition("{")[0]
        if name in ("spectts_kv_cache_slots_in_use", "spectts_requests_running",
                    "spectts_requests_waiting"):
            out[name] = out.get(name, 0.0) + float(value)
    return out


async def http_request(client: httpx.AsyncClient, text: str, drop: bool) -> str:
    body = {"input": text, "response_format": "pcm", "stream": drop}
    if not drop:
        r = await client.post("/v1/audio/speech", json=body)
        return "ok" if r.status_code == 200 else "refused" if r.status_code == 503 else \
            f"failed: HTTP {r.status_code} {r.text[:120]}"
    async with client.stream("POST", "/v1/audio/speech", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return "refused" if r.status_code == 503 else f"failed: HTTP {r.status_code}"
        async for _ in r.aiter_bytes():
            return "cancelled"  # leave after the first bytes: the server must stop this request
    return "ok"


async def ws_request(url: str, text: str, mode: str) -> str:
    import websockets

    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.config", "response_format": "pcm"}))
        await ws.send(json.dumps({"type": "input.text", "text": text}))
        await ws.send(json.dumps({"type": "input.done"}))
        while True:
            msg = await ws.recv()
            if isinstance(msg, bytes):
                if mode == "ws_dropped":
                    return "cancelled"  # the context manager closes the socket mid-stream
                if mode == "ws_cancel":
                    await ws.send(json.dumps({"type": "cancel"}))
                    mode = "ws_cancelled"
                continue
            event = json.loads(msg)
            if event["type"] == "error":
                code = event["error"].get("code")
                return "refused" if code == "server_busy" else f"failed: {event['error']}"
            if event["type"] == "session.done":
                if event["status"] == "completed":
                    return "ok"
                if event["status"] == "cancelled" and mode == "ws_cancelled":
                    return "cancelled"
                return f"failed: session {event['status']}"


async def soak(base: str, n: int, concurrency: int, texts: list[str], seed: int, pid: int
               ) -> tuple[dict, list[float]]:
    rng = random.Random(seed)
    plan = [(rng.choices(KINDS, WEIGHTS)[0], rng.choice(texts)) for _ in range(n)]
    outcomes: dict[str, int] = {}
    failures: list[str] = []
    rss: list[float] = []
    refusals = [0]
    url = base.replace("http://", "ws://") + "/v1/audio/speech/stream"
    queue = list(enumerate(plan))
    bar = tqdm(total=n, desc="soak requests")

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            i, (kind, text) = queue.pop(0)
            for _ in range(60):  # a refused client waits Retry-After (1 s) and tries again
                try:
                    if kind.startswith("http"):
                        result = await http_request(client, text, kind == "http_dropped")
                    else:
                        result = await ws_request(url, text, kind)
                except Exception as exc:  # noqa: BLE001 — a transport failure is a failure
                    result = f"failed: {exc!r}"
                if result != "refused":
                    break
                refusals[0] += 1
                await asyncio.sleep(1.0)
            key = result.split(":")[0]
            outcomes[f"{kind}/{key}"] = outcomes.get(f"{kind}/{key}", 0) + 1
            if key == "failed":
                failures.append(f"{kind}: {result}")
            if i == n // 10:
                rss.append(rss_mib(pid))
            bar.update()

    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    bar.close()
    return {"outcomes": dict(sorted(outcomes.items())), "failures": failures[:20],
            "failed": len(failures), "refusals_retried": refusals[0]}, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--decoding", default="auto")
    ap.add_argument("--accept", default="exact")
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--max-words", type=int, default=6, help="texts: held-out sentences cut to this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/soak.json")
    args = ap.parse_args()
    texts = [" ".join(s.split()[:args.max_words]).rstrip(",;:") + "." for s in load_eval_sentences()]
    server, port = serve(args, args.max_batch)
    base = f"http://127.0.0.1:{port}"
    try:
        start = time.perf_counter()
        report, rss = asyncio.run(soak(base, args.requests, args.concurrency, texts, args.seed,
                                       server.pid))
        wall = time.perf_counter() - start
        deadline, after = time.time() + 15, {}
        while time.time() < deadline:  # cancelled requests are freed at the engine's next step
            after = gauges(base)
            if not any(after.values()):
                break
            time.sleep(0.2)
        rss.append(rss_mib(server.pid))
    finally:
        server.terminate()
        server.wait(timeout=30)
    report.update({"wall_seconds": wall, "gauges_after": after, "rss_mib_warm": rss[0],
                   "rss_mib_end": rss[-1], "rss_growth_mib": rss[-1] - rss[0], "args": vars(args)})
    ok = report["failed"] == 0 and not any(after.values()) and report["rss_growth_mib"] < 50
    report["passed"] = ok
    print(json.dumps(report, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
