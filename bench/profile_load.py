"""Where the time goes under load: CPU seconds per thread of a server that N WebSocket clients load.

    .venv/bin/python -m bench.profile_load [--clients 1,16] [--requests-per-client 2] [--threads 1]
                                           [--vocoder-thread on,off] [--decoding auto] [--bundle DIR]

The server runs in this process (`spectts serve`'s service and app, with these settings; uvicorn in
a thread on a free loopback port), so that each of its threads is read by its own CPU clock
(`time.pthread_getcpuclockid`): the engine thread, the vocoder thread, the frontend thread and the
event loop (uvicorn: HTTP, WebSocket, encoding); the rest of the process (torch's OpenMP workers
when --threads > 1, asyncio's executor threads) is the process's CPU time less theirs. The server's
child processes (espeak-ng's helper, its forks once reaped) are read from /proc. The clients are the
load bench's (`bench.load.run_level`), in a process of their own that reports its CPU time.

Inside the engine thread its CPU time is split by thread CPU clocks around the engine's calls (each
wrapped on this server's objects, counted per thread): the target's forward (`forward`, `logits` of
its runner), proposing (`_propose`: draft heads and the tree, or the draft model), the rest of the
engine step (packing the cache, verification, accepting, committing), planning (`Engine.plan`), the
vocoder's batched pass (`push_many`, when it runs there: `--vocoder-thread off`), and the service's
own Python (admission, scheduling, taking frames, hand-over, events). In the vocoder thread: its
passes and the rest (flushing a sentence's end, events). The machine's busy CPU time (/proc/stat)
shows what else ran meanwhile (run it with background jobs stopped).

For each setting and N: after a one-sentence warm-up, every clock is read, the clients run (N at
once, --requests-per-client sentences each, refused sessions retried as `bench.load` does), every
clock is read again. Prints one markdown table per level (component, CPU seconds, share of wall:
100 % is one core busy for the whole level) and writes JSON to bench/results/profile_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ENGINE, VOCODER, FRONTEND, LOOP = "spectts-engine", "spectts-vocoder", "spectts-frontend", "event-loop"


class Clocks:
    """Thread CPU seconds spent inside wrapped calls, per (thread name, part)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)

    def wrap(self, owner, name: str, part: str) -> None:
        """Count `owner.name(...)`'s thread CPU time as `part` (an attribute on this instance)."""
        call = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return call(*args, **kwargs)
            finally:
                key = (threading.current_thread().name, part)
                self.seconds[key] += time.thread_time() - start

        setattr(owner, name, timed)

    def snapshot(self) -> dict[tuple[str, str], float]:
        return dict(self.seconds)


def instrument(service) -> Clocks:
    clocks = Clocks()
    engine = service.tts.engine
    clocks.wrap(engine.target_runner, "forward", "forward")
    clocks.wrap(engine.target_runner, "logits", "forward")
    clocks.wrap(engine, "_propose", "propose")
    clocks.wrap(engine, "step", "step")
    clocks.wrap(engine, "plan", "plan")
    clocks.wrap(service.tts, "push_many", "vocode")
    return clocks


def thread_cpu(names: tuple[str, ...]) -> dict[str, float]:
    """CPU seconds so far of this process's live threads with these names (summed per name)."""
    out = dict.fromkeys(names, 0.0)
    for t in threading.enumerate():
        if t.name in out and t.ident is not None:
            try:
                out[t.name] += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
            except (OSError, ProcessLookupError):  # ended between the listing and the read
                pass
    return out


def children_cpu(exclude: int) -> float:
    """CPU seconds of this process's child processes but `exclude` (and of their reaped
    children)."""
    tick, me, total = os.sysconf("SC_CLK_TCK"), str(os.getpid()), 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            # the fields after the command's closing parenthesis start at field 3 (state), then
            # ppid; utime stime cutime cstime are fields 14-17
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me and int(pid) != exclude:
            total += sum(int(x) for x in fields[11:15]) / tick
    return total


def machine_busy() -> float:
    """CPU seconds all processes of the machine have been busy (/proc/stat: not idle, not iowait)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(values[:8]) - values[3] - values[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def read_all(clocks: Clocks, clients_pid: int) -> dict:
    return {"threads": thread_cpu((ENGINE, VOCODER, FRONTEND, LOOP)), "process": time.process_time(),
            "children": children_cpu(clients_pid), "machine": machine_busy(), "parts": clocks.snapshot(),
            "wall": time.perf_counter()}


def table(before: dict, after: dict, clients_cpu: float) -> list[tuple[str, float]]:
    """(component, CPU seconds) rows between two readings; "engine: ..." and "vocoder: ..." rows
    split the thread's row above them."""
    th = {k: after["threads"][k] - before["threads"][k] for k in after["threads"]}
    part = defaultdict(float)
    for key, value in after["parts"].items():
        part[key] = value - before["parts"].get(key, 0.0)
    e = lambda p: part[(ENGINE, p)]  # noqa: E731
    step_rest = e("step") - e("forward") - e("propose")
    process = after["process"] - before["process"]
    children = after["children"] - before["children"]
    rows = [("engine thread", th[ENGINE]),
            ("engine: target forward (runner forward + logits)", e("forward")),
            ("engine: proposing (draft heads and tree, or draft model)", e("propose")),
            ("engine: rest of the step (cache packing, verify, accept, commit)", step_rest),
            ("engine: planning (Engine.plan)", e("plan")),
            ("engine: vocoder pass (push_many)", e("vocode")),
            ("engine: service (admission, scheduling, frames, hand-over, events)",
             th[ENGINE] - e("step") - e("plan") - e("vocode")),
            ("vocoder thread", th[VOCODER]),
            ("vocoder: batched pass (push_many)", part[(VOCODER, "vocode")]),
            ("vocoder: rest (sentence-end flush, events)", th[VOCODER] - part[(VOCODER, "vocode")]),
            ("frontend thread (sentences, phonemes)", th[FRONTEND]),
            ("event loop (uvicorn: HTTP, WebSocket, PCM)", th[LOOP]),
            ("rest of the server process (torch workers, executor threads)",
             process - sum(th.values())),
            ("server's child processes (espeak-ng helper)", children),
            ("clients (their own process)", clients_cpu),
            ("total (server + clients)", process + children + clients_cpu),
            ("whole machine, every process (/proc/stat)", after["machine"] - before["machine"])]
    return rows


def markdown(rows: list[tuple[str, float]], wall: float) -> str:
    lines = ["| component | CPU s | share of wall |", "|---|---|---|"]
    for name, seconds in rows:
        lines.append(f"| {name} | {seconds:.2f} | {100 * seconds / wall:.0f} % |")
    return "\n".join(lines)


class Server:
    """The app of `spectts serve` around a started service, uvicorn in the thread `event-loop`."""

    def __init__(self, settings, service) -> None:
        import uvicorn

        from server.app import create_app

        config = uvicorn.Config(create_app(settings, service=service), host="127.0.0.1", port=0,
                                log_level="warning", timeout_graceful_shutdown=2)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, name=LOOP, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise SystemExit("uvicorn did not start")
            time.sleep(0.02)
        port = self.uvicorn.servers[0].sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/v1/audio/speech/stream"

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)


def run_clients(url: str, n: int, per_client: int, rate: int, clocks: Clocks
                ) -> tuple[dict, dict, dict]:
    """`bench.load`'s clients in a process of their own, started and waiting; every clock is read
    (`read_all`), they run one level, every clock is read again. Returns their level row (with
    their CPU seconds) and the two readings."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "bench.profile_load", "--as-clients", url,
                             "--clients", str(n), "--requests-per-client", str(per_client),
                             "--rate", str(rate)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit("the client process did not start")
    before = read_all(clocks, proc.pid)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out = proc.stdout.readline()
    after = read_all(clocks, proc.pid)
    if proc.wait(timeout=60) != 0 or not out:
        raise SystemExit("the client process failed")
    return json.loads(out), before, after


def as_clients(args: argparse.Namespace) -> None:
    """The client process: say ready, wait for go, run one level, print its row as JSON."""
    from bench.load import run_level
    from models.recipes.corpus import load_eval_sentences

    sentences = load_eval_sentences()
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.process_time()
    row = asyncio.run(run_level(args.as_clients, int(args.clients), args.requests_per_client,
                                sentences, args.rate))
    print(json.dumps({**row, "cpu_seconds": time.process_time() - start}), flush=True)


def profile(args: argparse.Namespace, vocoder_thread: bool, levels: list[int]) -> list[dict]:
    """Serve with these settings; one measured run per level."""
    from server.app import load_service
    from server.settings import Settings
    from server.speech import describe

    settings = Settings(threads=args.threads, max_batch=args.max_batch, decoding=args.decoding,
                        accept=args.accept, vocoder_thread=vocoder_thread, log_level="warning",
                        **({"bundle": args.bundle} if args.bundle else {}))
    service, cfg = load_service(settings)
    clocks = instrument(service)
    rate = service.tts.sample_rate
    out = []
    try:
        with Server(settings, service) as url:
            run_clients(url, 1, 1, rate, clocks)  # warm-up
            for n in levels:
                row, before, after = run_clients(url, n, args.requests_per_client, rate, clocks)
                wall = after["wall"] - before["wall"]
                rows = table(before, after, row.pop("cpu_seconds"))
                out.append({"vocoder_thread": vocoder_thread, "clients": n, "wall_seconds": wall,
                            "torch_threads": args.threads, "default": describe(cfg, service.tts),
                            "load": row, "cpu_seconds": dict(rows)})
                print(f"\n### vocoder thread {'on' if vocoder_thread else 'off'}, N = {n}: "
                      f"{wall:.1f} s wall, {row['served']} sentences served, "
                      f"{row['audio_seconds_per_second']:.2f} audio s / wall s, decoding "
                      f"{describe(cfg, service.tts)}, {args.threads} torch thread(s); engine "
                      f"hand-overs held back by the vocoder so far: {service.vocoding.held}\n")
                print(markdown(rows, wall), flush=True)
    finally:
        service.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,16", help="levels, e.g. 1,16")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine thread")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--vocoder-thread", default="on", help="on, off or on,off: one server each")
    ap.add_argument("--decoding", default="auto")
    ap.add_argument("--accept", default="exact")
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--out", default="bench/results/profile_load.json")
    ap.add_argument("--as-clients", default=None, help=argparse.SUPPRESS)  # the client process
    ap.add_argument("--rate", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.as_clients:
        return as_clients(args)
    modes = [m.strip() for m in args.vocoder_thread.split(",")]
    if not modes or set(modes) - {"on", "off"}:
        ap.error("--vocoder-thread: on, off or on,off")
    levels = [int(x) for x in args.clients.split(",")]
    results = [r for m in modes for r in profile(args, m == "on", levels)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": results}, indent=2))


if __name__ == "__main__":
    main()
