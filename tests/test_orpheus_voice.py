"""The Orpheus family on a random checkpoint of the real layout (vocabulary 156940, special ids,
tied embeddings, llama3 rope scaling, bf16 shards, tokenizer.json) with a SNAC 24 kHz codec: the
prompt against a reconstruction of Orpheus's own, the token <-> code mapping, the slot mask, the
loader against transformers, exact draft speculation against plain greedy, the length cap."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("snac")
pytest.importorskip("tokenizers")

from engine.orpheus_tts import OrpheusTTS, load_tts, preflight  # noqa: E402
from engine.decoding.sampling import SamplingParams  # noqa: E402
from engine.types import GenerationConfig  # noqa: E402
from models.llama import LlamaForCausalLM  # noqa: E402
from models.voices import orpheus  # noqa: E402

GREEDY = GenerationConfig(max_new_tokens=10**6, sampling=SamplingParams(temperature=0.0))


@pytest.fixture(scope="module")
def tts(orpheus_dirs):
    ckpt, codec, draft = orpheus_dirs
    return OrpheusTTS(ckpt, codec, max_batch=2, max_len=160, draft_path=draft)


def test_prompt_equals_orpheus_format(tts, orpheus_dirs):
    """orpheus_tts's _format_prompt, rebuilt with transformers' tokenizer on the same file."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(orpheus_dirs[0] / "tokenizer.json"))
    for voice, text in [("tara", "Hello there <laugh> friend."), ("zac", "Numbers: 3.5, ok?")]:
        ids = hf(f"{voice}: {text}", return_tensors="pt").input_ids
        expected = torch.cat([torch.tensor([[128259]]), ids,
                              torch.tensor([[128009, 128260, 128261, 128257]])], dim=1)[0].tolist()
        (plan,) = tts.plan(text, voice=voice)
        assert plan.prompt == expected
        assert plan.prompt[1] == 128000  # the tokenizer's own BOS
        assert hf.decode(plan.prompt[2:-4]) == f"{voice}: {text}"  # tags pass through as text


def test_sentences_get_their_own_prompts(tts):
    plans = tts.plan("First one. Second one!", voice="leah")
    assert [p.text for p in plans] == ["First one.", "Second one!"]
    assert all(p.prompt[0] == orpheus.START_OF_HUMAN and p.prompt[-1] == orpheus.START_OF_SPEECH
               for p in plans)


@given(st.lists(st.lists(st.integers(0, 4095), min_size=7, max_size=7), min_size=1, max_size=6))
def test_tokens_codes_round_trip(frames):
    codes = np.array(frames)
    tokens = orpheus.tokens_from_codes(codes)
    # slot i of every frame sits in its own 4096-id block, code 0 included
    for k, t in enumerate(tokens):
        slot = k % 7
        assert orpheus.AUDIO_BASE + 4096 * slot <= t < orpheus.AUDIO_BASE + 4096 * (slot + 1)
    np.testing.assert_array_equal(orpheus.codes_from_tokens(tokens), codes)


def test_slot_layout_matches_orpheus_decoder():
    """decoder.py's convert_to_audio: slot 0 -> codebook 0; 1, 4 -> codebook 1; 2, 3, 5, 6 ->
    codebook 2, each code id - 128266 - 4096 * slot."""
    slots = np.arange(7) * 10 + 1  # distinct codes per slot
    tokens = [orpheus.AUDIO_BASE + 4096 * i + int(c) for i, c in enumerate(slots)]
    frame = orpheus.codes_from_tokens(tokens)[0]
    assert frame.tolist() == [slots[0], slots[1], slots[4], slots[2], slots[3], slots[5], slots[6]]
    with pytest.raises(ValueError, match="slot"):
        orpheus.codes_from_tokens([tokens[1]] + tokens[1:])  # a slot-1 id in slot 0


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 6), st.integers(0, 156939))
def test_mask_never_lets_a_wrong_slot_id_through(slot, token):
    masks = _MASKS
    allowed = bool(masks[slot][token])
    in_slot = orpheus.AUDIO_BASE + 4096 * slot <= token < orpheus.AUDIO_BASE + 4096 * (slot + 1)
    assert allowed == (in_slot or (slot == 0 and token == orpheus.END_OF_SPEECH))


_MASKS = orpheus.slot_masks(156940)


def test_sampled_generation_keeps_the_layout(tts):
    """Hot sampling on random weights tries every kind of id: each generated token is in its slot,
    the end of speech only at a frame boundary."""
    cfg = GenerationConfig(max_new_tokens=10**6, seed=3,
                           sampling=SamplingParams(temperature=2.0, repetition_penalty=1.3))
    for seed in range(3):
        plan = tts.plan("Hi there.")[0]
        r = tts.engine.generate(plan.prompt, tts.generation_config(plan, replace_seed(cfg, seed)),
                                tts.rule(plan))
        for k, t in enumerate(r.tokens):
            if t == orpheus.END_OF_SPEECH:
                assert k % 7 == 0 and k == len(r.tokens) - 1
            else:
                assert bool(_MASKS[k % 7][t])


def replace_seed(cfg: GenerationConfig, seed: int) -> GenerationConfig:
    from dataclasses import replace
    return replace(cfg, seed=seed)


def test_loader_equals_transformers(orpheus_dirs):
    """Sharded bf16 safetensors, tied embeddings, llama3 rope scaling: the same logits as
    transformers on the same directory."""
    transformers = pytest.importorskip("transformers")
    ckpt = orpheus_dirs[0]
    ours = LlamaForCausalLM.from_pretrained(ckpt)
    theirs = transformers.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    torch.testing.assert_close(ours.model.rotary.inv_freq, theirs.model.rotary_emb.inv_freq)
    ids = torch.tensor([[128259, 128000, *range(40, 90), 128009, 128260, 128261, 128257]])
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours.logits(ours(ids))
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)


def test_exact_draft_equals_plain_greedy(tts):
    """`--draft DIR` (a 1-layer Llama with the same vocabulary): exact acceptance gives plain
    greedy's tokens, token for token."""
    plan = tts.plan("Exact speculation.", voice="tara")[0]
    plain = tts.engine.generate(plan.prompt, tts.generation_config(plan, GREEDY), tts.rule(plan))
    from dataclasses import replace
    for gamma in (2, 5):
        cfg = replace(GREEDY, decoding="draft", accept="exact", gamma=gamma)
        draft = tts.engine.generate(plan.prompt, tts.generation_config(plan, cfg), tts.rule(plan))
        assert draft.tokens == plain.tokens
        assert draft.stats.target_forwards < plain.stats.target_forwards  # it did speculate


def test_a_speech_that_never_ends_is_capped_and_flagged(tts):
    """Random weights rarely choose the end of speech: the sentence stops at its cap (whole frames,
    within the cache), flagged `truncated`; its audio is 2048 samples per frame."""
    speech = tts.synthesize("Hi.", GREEDY, voice="mia")
    plan = tts.plan("Hi.")[0]
    cap = tts.max_new_tokens(plan)
    assert (cap - 1) % 7 == 0 and len(plan.prompt) + cap <= tts.engine.max_len
    assert speech.stats.truncated == 1 and speech.stats.tokens == cap
    assert len(speech.tokens) == cap - 1
    assert len(speech.audio) == 2048 * (cap - 1) // 7 and speech.sample_rate == 24000


def test_unknown_voice_lists_the_voices(tts):
    with pytest.raises(ValueError, match="tara, leah, jess, leo, dan, mia, zac, zoe"):
        tts.plan("Hello.", voice="alloy")


def test_missing_files_and_wrong_layouts_are_named(orpheus_dirs, tmp_path):
    ckpt, codec, _ = orpheus_dirs
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="lacks tokenizer.json"):
        preflight(broken, codec)
    shutil.copy(ckpt / "tokenizer.json", broken / "tokenizer.json")
    shard = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    (broken / sorted(set(shard.values()))[0]).unlink()
    with pytest.raises(ValueError, match="shards .* missing"):
        load_tts(broken, codec)
    config = json.loads((ckpt / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "vocab_size": 128256}))
    with pytest.raises(ValueError, match="not Orpheus's layout"):
        preflight(broken, codec)
    with pytest.raises(ValueError, match="lacks config.json"):
        preflight(ckpt, tmp_path)
    with pytest.raises(ValueError, match="give its SNAC 24 kHz codec"):
        load_tts(ckpt)
