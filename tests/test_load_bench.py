"""The load bench's client reads a refusal as the protocol says: a session refused at once
(`server_busy`, then close 1013) is a refusal to retry after `retry_after`, not an error, even when
the close arrives while the client is still sending its text."""

import asyncio
import json

import pytest

websockets = pytest.importorskip("websockets")
from websockets.asyncio.server import serve  # noqa: E402

from bench.load import session  # noqa: E402


def refused_at_once(retry_after: int):
    async def handler(ws):
        await ws.send(json.dumps({"type": "error", "retry_after": retry_after,
                                  "error": {"code": "server_busy", "message": "busy"}}))
        await ws.close(1013, "server busy")
    return handler


def test_a_session_refused_while_the_client_sends_is_a_refusal():
    async def run():
        async with serve(refused_at_once(3), "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            await asyncio.sleep(0)
            return await session(f"ws://127.0.0.1:{port}", "Hello there. " * 200, 22050)

    r = asyncio.run(run())
    assert r["refused"] and r["error"] is None and r["retry_after"] == 3.0 and r["audio"] == 0.0


def test_the_offline_capacity_loads_the_voice_as_the_server_does(tiny_voice):
    """The bench's offline baseline (`bench load`'s first figures) runs the served voice: it gives
    audio for every sentence, at some positive rate."""
    import argparse

    from bench.offline import capacities_for_load

    args = argparse.Namespace(threads=1, max_batch=2, decoding="plain", accept="exact",
                              bundle=str(tiny_voice), requests_per_client=1)
    out = capacities_for_load(args, [1, 2], ["batched"], ["Hello there.", "A second one."])
    assert set(out) == {1, 2}
    assert all(r["sentences"] == 2 and r["audio_seconds_per_second"] > 0 for r in out.values())
