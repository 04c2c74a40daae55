"""Draft heads for an Orpheus-family checkpoint (`spectts train-heads`, MEDUSA-2 self-distillation)
on a tiny random Orpheus-layout model: the recipe writes heads that load with the checkpoint, the
loss falls, exact heads decoding equals plain greedy token for token, the heads' tree honours the
slot mask, and the server serves `decoding: "heads"` with them."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import httpx
import numpy as np
import pytest
import torch
from hypothesis import given, settings as hsettings
from hypothesis import strategies as st

pytest.importorskip("snac")
pytest.importorskip("tokenizers")

from engine.decoding.heads_proposer import build_tree  # noqa: E402
from engine.decoding.sampling import SamplingParams  # noqa: E402
from engine.orpheus_tts import OrpheusTTS  # noqa: E402
from engine.tts import generate_answers  # noqa: E402
from engine.types import GenerationConfig  # noqa: E402
from models.recipes import train_heads  # noqa: E402
from models.voices import orpheus  # noqa: E402
from models.voices.heads_files import load_heads  # noqa: E402
from models.voices.random_orpheus import random_orpheus_model  # noqa: E402
from server.cli import main as spectts  # noqa: E402

GREEDY = GenerationConfig(max_new_tokens=10**6, sampling=SamplingParams(temperature=0.0))
TEXTS = ["Hello there.", "How are you today?", "A tag <laugh> passes.", "Fine, thanks."]
MAX_LEN = 120  # random weights never end their speech: each sentence stops at its cap


@pytest.fixture(scope="module")
def heads_dir(orpheus_dirs, tmp_path_factory):
    """`spectts train-heads` on the tiny checkpoint (greedy generations, 2 heads, a few steps)."""
    ckpt, codec, _ = orpheus_dirs
    root = tmp_path_factory.mktemp("heads")
    (root / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    out = root / "heads"
    rc = spectts(["train-heads", "--bundle", str(ckpt), "--codec", str(codec), "--texts",
                  str(root / "texts.txt"), "--out", str(out), "--num-heads", "2", "--steps", "15",
                  "--batch-rows", "48", "--lr", "3e-3", "--temperature", "0", "--max-len",
                  str(MAX_LEN), "--device", "cpu", "--threads", "1"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def tts(orpheus_dirs, heads_dir):
    ckpt, codec, _ = orpheus_dirs
    return OrpheusTTS(ckpt, codec, max_batch=2, max_len=MAX_LEN, heads_path=heads_dir)


def test_the_recipe_writes_heads_that_load_with_the_checkpoint(heads_dir, tts):
    spec = json.loads((heads_dir / "heads.json").read_text())
    assert spec["num_heads"] == 2 and spec["vocab_size"] == 156940
    assert np.array(spec["accuracies"]).shape == (2, train_heads.TOP_RANKS)
    assert spec["metrics"]["held_out"] == 1 and all(spec["metrics"]["rows"])
    assert tts.engine.heads.num_heads == 2
    assert tts.engine.bundle.heads_spec.accuracies == spec["accuracies"]  # they shape the tree
    other = random_orpheus_model(hidden_size=32, num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="hidden size 64"):
        load_heads(heads_dir, other)


def test_self_distillation_lowers_the_loss(tts):
    """Held-out-free check on the training answers: KL(target || heads) after training is well
    below that of the heads' start (each a copy of the target's output layer)."""
    target = tts.engine.target
    sequences = generate_answers(tts, TEXTS[:2], ["tara"], replace(GREEDY, seed=0))
    data = train_heads.record(target, sequences)
    seqs = torch.arange(len(sequences))
    torch.manual_seed(0)
    before = train_heads.measure(target, train_heads.new_heads(target, 2), data, seqs, "kl")
    heads, history = train_heads.train(target, data, seqs, num_heads=2, steps=15, batch_rows=48,
                                       lr=3e-3)
    after = train_heads.measure(target, heads, data, seqs, "kl")
    assert all(a < 0.9 * b for a, b in zip(after["loss"], before["loss"]))
    assert np.mean(history[-3:]) < np.mean(history[:3])
    # heads on the target's own output layer train only their blocks: the loss falls too
    shared, _ = train_heads.train(target, data, seqs, num_heads=2, steps=15, batch_rows=48,
                                  lr=1e-2, shared_out=True)
    assert shared.shared_out and not any(".out." in k for k in shared.state_dict())
    after = train_heads.measure(target, shared, data, seqs, "kl")
    assert all(a < 0.95 * b for a, b in zip(after["loss"], before["loss"]))


def test_exact_heads_equal_plain_greedy(tts):
    for text, voice in [("Exact speculation.", "tara"), ("Another one here.", "zoe")]:
        plan = tts.plan(text, voice=voice)[0]
        plain = tts.engine.generate(plan.prompt, tts.generation_config(plan, GREEDY),
                                    tts.rule(plan))
        cfg = replace(GREEDY, decoding="heads", accept="exact")
        heads = tts.engine.generate(plan.prompt, tts.generation_config(plan, cfg), tts.rule(plan))
        assert heads.tokens == plain.tokens
        assert heads.stats.drafted > 0  # the heads did propose


_RULE = orpheus.OrpheusRule(orpheus.slot_masks(156940))


@hsettings(max_examples=25, deadline=None)
@given(st.integers(0, 6), st.integers(0, 2**31 - 1))
def test_the_heads_tree_honours_the_slot_mask(slot, seed):
    """Whatever the heads rank first, every candidate is an id of its own slot (end of speech
    only at a frame boundary)."""
    logits = torch.randn(3, 156940, generator=torch.Generator().manual_seed(seed))
    logits[:, orpheus.END_OF_SPEECH] = 50.0  # the heads' favourite, allowed in slot 0 only
    shape = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1)]
    cands = build_tree(logits, shape, _RULE, slot, offset=0)
    assert len(cands) == len(shape)
    for i, token in enumerate(cands.tokens):
        parent = cands.parents[i]
        state = slot if parent < 0 else cands.states[parent]
        assert bool(_RULE.constraint(state).allowed[token])


def test_the_server_serves_heads(orpheus_dirs, heads_dir):
    from server.app import create_app
    from server.audio import pcm16
    from server.settings import Settings
    from tests.test_server import LiveServer

    ckpt, codec, _ = orpheus_dirs
    settings = Settings(bundle=ckpt, codec=codec, heads=heads_dir, device="cpu", threads=1,
                        decoding="plain", temperature=0.0, max_batch=2, max_len=MAX_LEN,
                        admission_control=False)
    reference = OrpheusTTS(ckpt, codec, max_batch=2, max_len=MAX_LEN)
    expected = np.frombuffer(pcm16(reference.synthesize("Hi.", GREEDY, voice="leo").audio), "<i2")
    with LiveServer(create_app(settings)) as live:
        live.wait_ready(timeout=120)
        with httpx.Client(base_url=live.url, timeout=120) as client:
            r = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "leo",
                                                      "decoding": "heads", "accept": "exact",
                                                      "response_format": "pcm"})
            assert r.status_code == 200, r.text
            got = np.frombuffer(r.content, "<i2")
            assert len(got) == len(expected)  # plain's tokens, so plain's audio
            assert np.abs(got.astype(np.int32) - expected.astype(np.int32)).max() <= 1
            metrics = client.get("/metrics").text
    drafted = [line for line in metrics.splitlines()
               if line.startswith("spectts_spec_decode_num_draft_tokens_total")]
    assert drafted and float(drafted[0].split()[-1]) > 0


def test_serve_refuses_a_heads_dir_without_its_files(orpheus_dirs, tmp_path):
    ckpt, codec, _ = orpheus_dirs
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--bundle", str(ckpt),
                           "--codec", str(codec), "--heads", str(tmp_path), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "lacks heads.json" in proc.stderr
