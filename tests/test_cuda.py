"""Checks that need a CUDA GPU (marked `cuda`: skipped elsewhere, run by bench/gpu_check.sh): bf16
checkpoints load in bf16 on CUDA and equal transformers there; the engine on CUDA gives plain
greedy's tokens with exact heads and draft (float32), keeps Orpheus's layout in bf16; draft heads
train on CUDA. Plus the dtype rule itself, which needs no GPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("snac")
pytest.importorskip("tokenizers")

from engine.decoding.sampling import SamplingParams  # noqa: E402
from engine.orpheus_tts import OrpheusTTS  # noqa: E402
from engine.tts import generate_answers  # noqa: E402
from engine.types import GenerationConfig  # noqa: E402
from models.heads import DraftHeads  # noqa: E402
from models.llama import LlamaForCausalLM, init_weights, load_dtype  # noqa: E402
from models.recipes import train_heads  # noqa: E402
from models.voices import orpheus  # noqa: E402
from models.voices.bundle import HeadsSpec  # noqa: E402
from models.voices.heads_files import save_heads  # noqa: E402
from models.voices.random_orpheus import random_orpheus_model, save_checkpoint  # noqa: E402

GREEDY = GenerationConfig(max_new_tokens=10**6, sampling=SamplingParams(temperature=0.0))
MASKS = orpheus.slot_masks(156940)


def test_half_checkpoints_run_in_their_dtype_on_cuda_only():
    assert load_dtype({"torch_dtype": "bfloat16"}, "cuda") == torch.bfloat16
    assert load_dtype({"torch_dtype": "float16"}, "cuda") == torch.float16
    assert load_dtype({"torch_dtype": "float32"}, "cuda") == torch.float32
    assert load_dtype({"torch_dtype": "bfloat16"}, "cpu") == torch.float32


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    """Random heads for the tiny checkpoint (hidden 64)."""
    heads = DraftHeads(3, 64, 156940)
    init_weights(heads, std=0.2, seed=5)
    return save_heads(heads, tmp_path_factory.mktemp("heads"), HeadsSpec(num_heads=3), {})


def keeps_layout(tokens: list[int]) -> bool:
    return all((t == orpheus.END_OF_SPEECH and k % 7 == 0) or bool(MASKS[k % 7][t])
               for k, t in enumerate(tokens))


@pytest.mark.cuda
def test_bf16_loader_on_cuda_equals_transformers(orpheus_dirs):
    transformers = pytest.importorskip("transformers")
    ckpt = orpheus_dirs[0]
    ours = LlamaForCausalLM.from_pretrained(ckpt, "cuda")
    assert ours.lm_head.weight.dtype == torch.bfloat16
    assert ours.model.rotary.inv_freq.dtype == torch.float32
    theirs = transformers.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.bfloat16)
    theirs = theirs.to("cuda").eval()
    ids = torch.tensor([[128259, 128000, *range(40, 90), 128009, 128260, 128261, 128257]],
                       device="cuda")
    with torch.no_grad():
        expected = theirs(ids).logits.float()
        got = ours.logits(ours(ids))
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.cuda
def test_exact_heads_and_draft_equal_plain_on_cuda_float32(orpheus_dirs, heads_dir, tmp_path):
    _, codec, draft = orpheus_dirs
    ckpt = save_checkpoint(random_orpheus_model(seed=0), tmp_path / "f32", dtype=torch.float32)
    tts = OrpheusTTS(ckpt, codec, device="cuda", max_batch=2, max_len=160, draft_path=draft,
                     heads_path=heads_dir)
    assert tts.engine.target.lm_head.weight.dtype == torch.float32
    plan = tts.plan("Exact on the GPU.", voice="tara")[0]
    plain = tts.engine.generate(plan.prompt, tts.generation_config(plan, GREEDY), tts.rule(plan))
    for cfg in (replace(GREEDY, decoding="heads"), replace(GREEDY, decoding="draft", gamma=3)):
        got = tts.engine.generate(plan.prompt, tts.generation_config(plan, cfg), tts.rule(plan))
        assert got.tokens == plain.tokens and got.stats.drafted > 0


@pytest.mark.cuda
def test_bf16_engine_on_cuda_keeps_the_layout(orpheus_dirs, heads_dir):
    ckpt, codec, _ = orpheus_dirs
    tts = OrpheusTTS(ckpt, codec, device="cuda", max_batch=2, max_len=160, heads_path=heads_dir)
    assert tts.engine.cache.k.dtype == torch.bfloat16
    assert tts.engine.heads.heads[0].out.weight.dtype == torch.bfloat16
    speech = tts.synthesize("Half precision.", replace(GREEDY, decoding="heads"), voice="mia")
    assert keeps_layout(speech.tokens) and len(speech.audio) == 2048 * len(speech.tokens) // 7
    sampled = replace(GREEDY, seed=1, sampling=orpheus.SAMPLING)
    plan = tts.plan("Sampled.")[0]
    r = tts.engine.generate(plan.prompt, tts.generation_config(plan, sampled), tts.rule(plan))
    assert keeps_layout(r.tokens)


@pytest.mark.cuda
def test_train_heads_on_cuda(orpheus_dirs):
    ckpt, codec, _ = orpheus_dirs
    tts = OrpheusTTS(ckpt, codec, device="cuda", max_batch=4, max_len=160)
    target = tts.engine.target
    sequences = generate_answers(tts, ["Hello there.", "On the GPU."], ["tara"],
                                     replace(GREEDY, seed=0))
    data = train_heads.record(target, sequences)
    seqs = torch.arange(len(sequences), device="cuda")
    before = train_heads.measure(target, train_heads.new_heads(target, 2), data, seqs, "kl")
    heads, _ = train_heads.train(target, data, seqs, num_heads=2, steps=30, batch_rows=64, lr=3e-3)
    after = train_heads.measure(target, heads, data, seqs, "kl")
    assert all(a < 0.9 * b for a, b in zip(after["loss"], before["loss"]))
