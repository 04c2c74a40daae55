"""Load benchmark: N concurrent WebSocket clients against a real server process over loopback.

    .venv/bin/python -m bench.load [--clients 1,4,16,32] [--requests-per-client 3] [--threads 1]
                                   [--modes batched,inline,single] [--replicas 1,2] [--url URL]

For each mode it starts `spectts serve` (its own process, --threads torch threads) on a free loopback
port: `batched` is the continuous-batching scheduler (--max-batch slots), `inline` the same with the
vocoder in the engine thread (--no-vocoder-thread), `single` the batched server with --max-batch 1
(one request at a time, the others queued). `--replicas 1,2` instead starts
`spectts serve --replicas R` on Ray Serve for each R (R = 1 also on Ray: one replica, so that the
rows differ only in the replica count; --replica-num-cpus per replica); `--url` measures a server
that is already running (e.g. on a cluster) and starts nothing. Then for each N it runs N clients at
once; each speaks held-out sentences one session at a time over /v1/audio/speech/stream. A session
refused at capacity (admission control, "server_busy") is retried after the server's retry_after, as
a client honouring Retry-After would (`--no-retry`: it is dropped), so every client keeps offering
load. A session over capacity waits in the server's FIFO queue (`session.queued`) and is refused only
after max_queue_wait_s. Per admitted session: time to first audio after admission (request sent ->
first PCM frame, less the queue wait the server reports), the real-time factor (session wall time /
audio seconds) and the longest playback underrun of a player that starts at the first byte and
plays continuously; per sentence, the wait before admission (queued, and refused attempts with their
retry delays). Aggregate: audio seconds per wall second; refusals and failed sessions are counted
apart. Beside it, the offline pipeline's capacity in the same run (`bench.offline`: the largest level's
sentences, the same voice, threads and decoding, engine + vocoder batched at min(N, max batch), no
server; measured before the servers start) and the share of it the server delivers. Prints one table, both modes side
by side; writes JSON to bench/results/load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from bench.offline import capacities_for_load
from models.recipes.corpus import load_eval_sentences

SAMPLE_BYTES = 2  # PCM16 mono


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def underrun(arrivals: list[tuple[float, float]]) -> float:
    """arrivals: (seconds since the first chunk, audio seconds received before this chunk). A player
    starting at the first chunk stalls whenever a chunk arrives after its play time; returns the
    longest single stall."""
    stalled, worst = 0.0, 0.0
    for t, before in arrivals:
        due = before + stalled
        if t > due:
            worst = max(worst, t - due)
            stalled += t - due
    return worst


async def session(url: str, text: str, sample_rate: int) -> dict:
    import websockets

    async with websockets.connect(url, max_size=None) as ws:
        start = time.perf_counter()
        try:
            await ws.send(json.dumps({"type": "session.config", "response_format": "pcm"}))
            await ws.send(json.dumps({"type": "input.text", "text": text}))
            await ws.send(json.dumps({"type": "input.done"}))
        except websockets.ConnectionClosed:
            pass  # refused at once (server_busy, then close 1013): its message is still to be read
        first, audio, arrivals, error, refused, retry_after = None, 0.0, [], None, False, 1.0
        queue_wait, position = 0.0, 0  # seconds queued (the server's stats), furthest place in line
        while True:
            msg = await ws.recv()
            now = time.perf_counter()
            if isinstance(msg, bytes):
                if first is None:
                    first = now
                arrivals.append((now - first, audio))
                audio += len(msg) / SAMPLE_BYTES / sample_rate
                continue
            event = json.loads(msg)
            if event["type"] == "session.queued":
                position = max(position, event["position"])
            if event["type"] == "session.done":
                queue_wait = event["stats"].get("queue_wait_seconds") or 0.0
            if event["type"] == "error":
                refused = event["error"].get("code") == "server_busy"
                error = None if refused else event["error"]
                retry_after = float(event.get("retry_after", retry_after))
            if event["type"] in ("session.done", "error"):
                break
    wall = time.perf_counter() - start
    return {"ttfa": (first - start - queue_wait) if first else None, "audio": audio, "wall": wall,
            "rtf": wall / audio if audio else None, "underrun": underrun(arrivals),
            "error": error, "refused": refused, "retry_after": retry_after, "queue": queue_wait,
            "position": position}


async def spoken(url: str, text: str, rate: int, retry: bool, give_up_s: float = 120.0) -> dict:
    """One sentence: sessions until one is admitted (retrying after retry_after when `retry`);
    `refusals` counts the refused attempts, `wait` the seconds before admission: from the first
    attempt to the admitted one, plus its time in the server's queue."""
    start, refusals = time.perf_counter(), 0
    while True:
        attempt = time.perf_counter()
        try:
            r = await session(url, text, rate)
        except Exception as exc:  # noqa: BLE001 — a failed session is a measured error
            # a handshake answered 503 (Ray Serve's back-pressure before any replica sees the
            # socket) is a refusal like the server's own server_busy: retried after Retry-After
            response = getattr(exc, "response", None)
            busy = getattr(response, "status_code", None) == 503
            after = float(response.headers.get("Retry-After", 1)) if busy else 0.0
            r = {"error": None if busy else repr(exc), "ttfa": None, "audio": 0.0, "rtf": None,
                 "underrun": 0.0, "wall": 0.0, "refused": busy, "retry_after": after,
                 "queue": 0.0, "position": 0}
        if not r["refused"] or not retry or time.perf_counter() - start > give_up_s:
            return {**r, "refusals": refusals + r["refused"],
                    "wait": attempt - start + r["queue"]}
        refusals += 1
        await asyncio.sleep(r["retry_after"])


async def run_level(url: str, n: int, per_client: int, sentences: list[str], rate: int,
                    retry: bool = True) -> dict:
    async def client(i: int) -> list[dict]:
        return [await spoken(url, sentences[(i * per_client + j) % len(sentences)], rate, retry)
                for j in range(per_client)]

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client(i) for i in range(n))) for r in rs]
    wall = time.perf_counter() - start
    ok = [r for r in results if not r["error"] and not r["refused"] and r["ttfa"] is not None]
    dropped = sum(r["refused"] for r in results)  # refused and not retried (or given up)
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    ttfa = [r["ttfa"] for r in ok]
    waits = [r["wait"] for r in ok]
    return {"clients": n, "sentences": len(results), "served": len(ok), "dropped": dropped,
            "refusals": sum(r["refusals"] for r in results),
            "errors": len(results) - len(ok) - dropped,
            "error_kinds": sorted({str(r["error"])[:120] for r in results if r["error"]}),
            "ttfa_p50_ms": 1000 * statistics.median(ttfa) if ttfa else None,
            "ttfa_p95_ms": 1000 * q(ttfa, 95) if ttfa else None,
            "wait_p50_ms": 1000 * statistics.median(waits) if waits else None,
            "wait_max_ms": 1000 * max(waits) if waits else None,
            "queued": sum(r["position"] > 0 for r in results),
            "rtf_median": statistics.median(r["rtf"] for r in ok) if ok else None,
            "max_underrun_ms": 1000 * max((r["underrun"] for r in ok), default=0.0),
            "audio_seconds_per_second": sum(r["audio"] for r in ok) / wall}


def serve(args: argparse.Namespace, max_batch: int, replicas: int | None = None,
          flags: tuple[str, ...] = ()):
    """Start a server process (`replicas`: on Ray Serve; `flags`: more `spectts serve` flags);
    returns (process, port) once ready."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--threads",
           str(args.threads), "--max-batch", str(max_batch), "--decoding", args.decoding,
           "--accept", args.accept, "--log-level", "warning", *flags]
    if args.bundle:
        cmd += ["--bundle", args.bundle]
    if replicas is not None:  # min = max: a fixed count, through Ray even for one replica
        cmd += ["--replicas", str(replicas), "--min-replicas", str(replicas), "--max-replicas",
                str(replicas), "--replica-num-cpus", str(args.replica_num_cpus),
                "--ray-metrics-port", str(free_port())]
    server = subprocess.Popen(cmd)
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                return server, port
        except httpx.TransportError:
            pass
        if time.time() > deadline or server.poll() is not None:
            server.terminate()
            raise SystemExit("the server did not become ready")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", default="1,4,16,32")
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--modes", default="batched,single", help="batched: --max-batch slots; "
                    "inline: the same, the vocoder in the engine thread; single: one request at "
                    "a time")
    ap.add_argument("--decoding", default="auto")
    ap.add_argument("--accept", default="exact")
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--no-retry", dest="retry", action="store_false",
                    help="drop a refused session instead of retrying it after retry_after")
    ap.add_argument("--replicas", default=None, help="e.g. 1,2: Ray Serve replicas per run "
                                                       "(instead of --modes)")
    ap.add_argument("--replica-num-cpus", type=float, default=1.0)
    ap.add_argument("--url", default=None, help="a running server (http://host:port): start none")
    ap.add_argument("--out", default="bench/results/load.json")
    args = ap.parse_args()
    import httpx

    levels = [int(x) for x in args.clients.split(",")]
    if args.url:
        modes = ["url"]
    elif args.replicas:
        modes = [f"r{int(r)}" for r in args.replicas.split(",")]
    else:
        modes = args.modes.split(",")
    sentences = load_eval_sentences()
    offline = capacities_for_load(args, levels, modes, sentences)
    rows, chosen = [], None
    bar = tqdm(total=len(levels) * len(modes), desc="load levels")
    for mode in modes:
        if mode == "url":
            server, base = None, args.url.rstrip("/")
        else:
            replicas = int(mode[1:]) if args.replicas else None
            server, port = serve(args, args.max_batch if mode != "single" else 1, replicas,
                                 ("--no-vocoder-thread",) if mode == "inline" else ())
            base = f"http://127.0.0.1:{port}"
        try:
            chosen = httpx.get(f"{base}/ready").json().get("default")
            voices = httpx.get(f"{base}/v1/audio/voices").json()["voices"]
            rate = int(voices[0].get("sample_rate", 22050))
            url = base.replace("http", "ws", 1) + "/v1/audio/speech/stream"
            for n in levels:
                row = asyncio.run(run_level(url, n, args.requests_per_client, sentences, rate,
                                            args.retry))
                base = offline[min(n, args.max_batch) if mode != "single" else 1]
                rows.append({"mode": mode, "default": chosen, **row,
                             "offline_audio_seconds_per_second": base["audio_seconds_per_second"],
                             "offline_batch": base["batch"],
                             "share_of_offline": row["audio_seconds_per_second"]
                             / base["audio_seconds_per_second"]})
                bar.update()
        finally:
            if server is not None:
                server.terminate()  # a Ray launcher stops its whole cluster on SIGTERM
                server.wait(timeout=120)
    bar.close()
    print(f"\nserver: {args.threads} torch thread(s), decoding {args.decoding}/{args.accept} "
          f"({chosen}); "
          f"batched = --max-batch {args.max_batch}, inline = batched with the vocoder in the "
          f"engine thread, single = --max-batch 1, rN = N Ray Serve "
          f"replicas of {args.replica_num_cpus:g} CPU, url = {args.url}; "
          f"{args.requests_per_client} sentences per client, refused sessions "
          f"{'retried after retry_after' if args.retry else 'dropped'}; TTFA from admission, queue: "
          f"wait before it; offline: engine + vocoder batched at min(N, max batch), same voice, threads "
          f"and decoding, the largest level's sentences, no server")
    print(f"{'mode':>8} {'N':>3} {'served':>6} {'queued':>6} {'dropped':>7} {'refusals':>8} "
          f"{'err':>4} {'TTFA p50':>9} {'p95':>7} {'queue p50':>10} {'max':>7} {'RTF med':>8} "
          f"{'underrun':>9} {'audio s/s':>10} {'offline':>8} {'share':>6}")
    for r in rows:
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        print(f"{r['mode']:>8} {r['clients']:>3} {r['served']:>6} {r['queued']:>6} "
              f"{r['dropped']:>7} {r['refusals']:>8} {r['errors']:>4} "
              f"{fmt(r['ttfa_p50_ms'], '8.0f')}ms {fmt(r['ttfa_p95_ms'], '5.0f')}ms "
              f"{fmt(r['wait_p50_ms'], '8.0f')}ms {fmt(r['wait_max_ms'], '5.0f')}ms "
              f"{fmt(r['rtf_median'], '8.3f')} {r['max_underrun_ms']:7.0f}ms "
              f"{r['audio_seconds_per_second']:10.2f} {r['offline_audio_seconds_per_second']:8.2f} "
              f"{100 * r['share_of_offline']:5.0f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "offline": list(offline.values()), "rows": rows},
                              indent=2))


if __name__ == "__main__":
    main()
