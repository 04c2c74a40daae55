"""`spectts bench vocoder-stream`: the simulated chunk pattern is the service's (every frame once,
in order, a sentence's last chunk flushed, one entry per stream and pass), and the bench replays it
through this tree's and a git revision's streaming vocoder with offline-equal audio. No timing is
judged."""

import json
import subprocess
import sys

import numpy as np
import pytest

from bench.vocoder_stream import ROOT, chunk_pattern, main
from engine.serving.chunker import ChunkSizes

SIZES = ChunkSizes.for_voice(4, 40, 441, 22050, 661)


@pytest.mark.parametrize("streams,speed", [(1, 2.0), (6, 1.1), (6, 5.0)])
def test_the_pattern_sends_every_frame_once_in_chunks_the_service_would(streams, speed):
    rng = np.random.default_rng(streams)
    sentences = [[rng.integers(0, 100, int(n)) for n in rng.integers(30, 200, 3)]
                 for _ in range(streams)]
    passes = chunk_pattern(sentences, SIZES, frames_per_step=1.3, speed=speed)
    pushed = [[] for _ in range(streams)]
    for batch in passes:
        assert len({p.stream for p in batch}) == len(batch)  # one chunk per stream and pass
        for p in batch:
            pushed[p.stream].append(p)
    for s, pushes in zip(sentences, pushed):
        ends = np.cumsum([len(t) for t in s])
        sent = np.cumsum([len(p.tokens) for p in pushes])
        assert [int(x) for x in sent[[p.flush for p in pushes]]] == [int(x) for x in ends]
        assert np.array_equal(np.concatenate([p.tokens for p in pushes]), np.concatenate(s))
        first = pushes[0]
        assert len(first.tokens) == min(SIZES.size(0), len(s[0]))
        assert max(len(p.tokens) for p in pushes) <= SIZES.chunk_frames + 2  # a step's frames


def test_the_bench_compares_with_a_git_revision(tiny_voice, tmp_path, monkeypatch, capsys):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", [
        "vocoder_stream", "--bundle", str(tiny_voice), "--streams", "1,3", "--sentences", "2",
        "--frames", "40", "--offline-batch", "4", "--repeats", "1", "--baseline", "HEAD",
        "--out", str(out)])
    main()
    rows = json.loads(out.read_text())["rows"]
    streamed = [r for r in rows if r["case"].startswith("streaming")]
    assert [r["case"] for r in streamed] == ["streaming, 1 stream(s)", "streaming, 3 stream(s)"]
    for row in streamed:
        assert set(row["max_abs_diff"]) == {"baseline HEAD", "this tree"}
        assert max(row["max_abs_diff"].values()) < 1e-4
        assert all(v > 0 for v in row["cpu_s_per_audio_s"].values())
    assert "| streaming, 3 stream(s) |" in capsys.readouterr().out
