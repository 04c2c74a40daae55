"""`spectts bench profile-load` on the random tiny voice, one client: the table accounts for the
threads that did the work (vocoding in the vocoder thread, or in the engine's when it is off), and
the engine thread's parts add up to it. Structure only: no timing is judged."""

import argparse

import pytest

pytest.importorskip("websockets")
from bench.profile_load import markdown, profile  # noqa: E402


@pytest.mark.parametrize("vocoder_thread", [True, False])
def test_profile_accounts_for_the_threads_that_worked(vocoder_thread, tiny_voice, capsys):
    args = argparse.Namespace(threads=1, max_batch=3, decoding="plain", accept="exact",
                              bundle=str(tiny_voice), requests_per_client=1)
    [run] = profile(args, vocoder_thread, [1])
    cpu = run["cpu_seconds"]
    assert run["clients"] == 1 and run["load"]["served"] == 1 and run["load"]["errors"] == 0
    assert cpu["engine thread"] > 0 and cpu["engine: target forward (runner forward + logits)"] > 0
    parts = [v for k, v in cpu.items() if k.startswith("engine: ")]
    assert sum(parts) == pytest.approx(cpu["engine thread"])
    assert min(parts) > -0.05  # each part is measured inside the thread's own total
    vocoded_here = cpu["engine: vocoder pass (push_many)"]
    if vocoder_thread:
        assert vocoded_here == 0 and cpu["vocoder: batched pass (push_many)"] > 0
    else:
        assert vocoded_here > 0 and cpu["vocoder thread"] == 0
    assert cpu["clients (their own process)"] > 0
    table = markdown(list(cpu.items()), run["wall_seconds"])
    assert "| engine thread |" in table and capsys.readouterr().out.count("| component |") == 1
