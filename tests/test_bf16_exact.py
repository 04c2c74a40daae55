"""bfloat16 on the CPU: exact speculation gives plain decoding's tokens, token for token.

In bf16 a row's bits depend on the rows beside it unless inference is batch-invariant (one-row
projections run as two rows, `models.llama.project`; attention one query at a time over keys
padded by the query's own count, `models.invariant_attention`): without it, exact heads and draft
leave plain greedy within a hundred tokens on most of these prompts (docs/engine.md, 2026-12-07).
"""

import copy

import pytest
import torch

from engine.decoding.engine import Engine
from engine.decoding.sampling import SamplingParams
from engine.decoding.tree import sparse_tree
from engine.types import GenerationConfig
from models.kv_cache import KVCache
from models.llama import project
from models.voices.bundle import random_bundle
from models.voices.rules import InterleavedRule

# An interleaved vocabulary: 0 bos, 1 sep, 2 eop, 3 eos, 4..19 phonemes, 20..159 speech.
V, EOP, EOS = 160, 2, 3
PHONEMES, SPEECH = range(4, 20), range(20, 160)
NEW = 100  # tokens per decode
PROMPTS = [torch.randint(4, V, (n,), generator=torch.Generator().manual_seed(i)).tolist()
           for i, n in enumerate([5, 8, 13, 21, 34, 55, 63, 64, 65, 89, 100, 120, 3, 9, 17, 40,
                                  70, 110, 128, 130])]
TREES = [tuple(sparse_tree([[0.5, 0.3, 0.2, 0.1]] * 4, n)) for n in (3, 8, 24)]
GREEDY = SamplingParams(temperature=0.0)


def bf16_engine(draft_copies_target: bool) -> Engine:
    bundle = random_bundle(vocab_size=V, hidden_size=128, num_layers=2, num_heads=4,
                           num_kv_heads=2, intermediate_size=1536, std=0.3, seed=3)
    if draft_copies_target:  # most drafts are right: long accepted chains written by the verify
        bundle.draft = copy.deepcopy(bundle.target)
    for m in (bundle.target, bundle.draft, bundle.heads):
        m.to(torch.bfloat16)
    return Engine(bundle, max_batch=4, max_len=NEW + 160, runner="torch")


@pytest.fixture(scope="module")
def engines():
    return {False: bf16_engine(False), True: bf16_engine(True)}


@pytest.fixture(scope="module")
def plain(engines):
    """Plain greedy decoding of every prompt: the reference."""
    engine = engines[False]
    assert engine.cache.k.dtype == torch.bfloat16 and engine.cache.batch_invariant
    return [engine.generate(p, GenerationConfig(max_new_tokens=NEW, sampling=GREEDY)).tokens
            for p in PROMPTS]


def interleaved_rule(phonemes: list[int]) -> InterleavedRule:
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[SPEECH.start:SPEECH.stop] = True
    allowed[EOP] = True
    return InterleavedRule(phonemes, allowed, EOP, EOS, max_frames=12)


def test_one_row_projection_gives_the_row_its_bits_among_many():
    """The one-row product would take another kernel (4 in 20 of these differ without the rule)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        w = torch.randn(3072, 1024, generator=gen).to(torch.bfloat16)
        x = torch.randn(1, 9, 3072, generator=gen).to(torch.bfloat16)
        many = project(x, w, None)  # (1, 9, 1024)
        assert torch.equal(project(x[:, :1], w, None), many[:, :1])
        assert torch.equal(project(x[0, 4], w, None), many[0, 4])  # (in,): one row too


def test_tokens_have_the_same_bits_alone_and_in_a_block(engines):
    """Two plain steps (one row each) against the same two tokens in one verify block: the root
    and a node of a tree (after a sibling: its keys gathered) or of a chain (a view). Hidden
    states, logits and the K/V they write, bit for bit."""
    model = engines[False].target
    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    blocks = [([-1, 0, 0, 1, 2, 2], 2), ([-1, 0, 0, 0], 3), ([-1, 0], 1), ([-1, 0, 1, 2], 1)]

    def forward(cache, block, parents):
        hidden = model(torch.tensor([block]), cache, cache.layout([0], [parents]))[0]  # (T, D)
        return hidden, model.logits(hidden)  # a plain step's logits: of one row

    for prompt in PROMPTS:
        caches = [KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 200, cfg.head_dim,
                          torch.bfloat16) for _ in range(len(blocks) + 1)]  # plain's first
        token = prompt[-1]
        with torch.inference_mode():
            for cache in caches:
                cache.allocate()
                model(torch.tensor([prompt[:-1]]), cache,
                      cache.layout([0], [list(range(-1, len(prompt) - 2))]))
                cache.commit(0, list(range(len(prompt) - 1)))
            for _ in range(5):
                n, alone, tokens = caches[0].lengths[0], [], [token]
                for t in range(2):  # two plain steps: this token, then its greedy successor
                    hidden, logits = forward(caches[0], [tokens[t]], [-1])
                    caches[0].commit(0, [0])
                    alone.append((hidden[0], logits[0], caches[0].k[:, 0, :, n + t],
                                  caches[0].v[:, 0, :, n + t]))
                    tokens.append(int(logits[0].argmax()))
                for cache, (parents, node) in zip(caches[1:], blocks):
                    block = torch.randint(4, V, (len(parents),), generator=gen).tolist()
                    block[0], block[node] = tokens[0], tokens[1]
                    hidden, logits = forward(cache, block, parents)
                    cache.commit(0, [0, node])
                    for row, t in ((0, 0), (node, 1)):
                        got = (hidden[row], logits[row], cache.k[:, 0, :, n + t],
                               cache.v[:, 0, :, n + t])
                        assert all(torch.equal(a, b) for a, b in zip(got, alone[t]))
                token = tokens[2]


def test_invariant_attention_attends_to_what_the_mask_allows(engines):
    """Against the single masked call (float32's path) on the same bf16 model: prompts across
    key blocks, a tree, a chain and several sequences with a gap between their slots."""
    model = engines[False].target
    cfg = model.config
    caches = [KVCache(cfg.num_hidden_layers, 4, cfg.num_key_value_heads, 300, cfg.head_dim,
                      torch.bfloat16, batch_invariant=flag) for flag in (True, False)]
    tree = [-1, 0, 0, 1, 1, 2, 3, 3]
    steps = [([0, 2, 3], [list(range(-1, n - 1)) for n in (70, 5, 130)]),  # prompts
             ([0], [tree]), ([2], [list(range(-1, 4))]),  # a tree after 70, a chain after 5
             ([0, 2, 3], [tree, list(range(-1, 3)), [-1]])]
    gen = torch.Generator().manual_seed(1)
    for slots, parents in steps:
        ids = torch.randint(0, V, (len(slots), max(len(p) for p in parents)), generator=gen)
        out = []
        for cache in caches:
            if cache.slots_in_use == 0:
                for _ in range(4):
                    cache.allocate()
            layout = cache.layout(slots, parents)
            assert (layout.queries is not None) == cache.batch_invariant
            with torch.inference_mode():
                hidden = model(ids, cache, layout).float()  # (B, T, D)
            out.append(torch.cat([hidden[b, :len(p)] for b, p in enumerate(parents)]))
            for s, p in zip(slots, parents):
                cache.commit(s, list(range(len(p))) if p == list(range(-1, len(p) - 1)) else [0])
        err = (out[0] - out[1]).abs().max()
        assert err <= 0.05 * out[1].abs().max(), err


def test_exact_heads_equal_plain_greedy(engines, plain):
    engine = engines[False]
    accepted = 0
    for i, (prompt, expected) in enumerate(zip(PROMPTS, plain)):
        for tree in (TREES[i % 3], TREES[(i + 1) % 3]):  # each tree on 2 prompts in 3
            got = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, decoding="heads",
                                                           tree=tree, sampling=GREEDY))
            assert got.tokens == expected
            accepted += got.stats.accepted
    assert accepted > 0


@pytest.mark.parametrize("draft_copies_target", [False, True])
def test_exact_draft_equals_plain_greedy(engines, plain, draft_copies_target):
    engine = engines[draft_copies_target]
    accepted = drafted = 0
    for i, (prompt, expected) in enumerate(zip(PROMPTS, plain)):
        got = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, decoding="draft",
                                                       gamma=1 + i % 5, sampling=GREEDY))
        assert got.tokens == expected
        accepted, drafted = accepted + got.stats.accepted, drafted + got.stats.drafted
    assert accepted > (drafted // 2 if draft_copies_target else 0)


def test_exact_modes_equal_plain_with_an_interleaved_rule(engines):
    engine = engines[True]
    for i, prompt in enumerate(PROMPTS[:10]):
        phonemes = [PHONEMES[(7 * i + 3 * k) % len(PHONEMES)] for k in range(2 + i % 6)]
        cfg = GenerationConfig(max_new_tokens=NEW, sampling=GREEDY)
        expected = engine.generate(prompt, cfg, interleaved_rule(phonemes)).tokens
        for decoding, tree in (("heads", TREES[i % 3]), ("draft", None)):
            got = engine.generate(prompt, GenerationConfig(
                max_new_tokens=NEW, decoding=decoding, tree=tree, gamma=4, sampling=GREEDY),
                interleaved_rule(phonemes))
            assert got.tokens == expected


def test_exact_heads_equal_plain_sampling(engines):
    """Sampled (seeded): one draw per position in the same order, so the same tokens."""
    engine = engines[False]
    sampling = SamplingParams(temperature=0.9, top_k=8, repetition_penalty=1.3,
                              repetition_window=6)
    for i, prompt in enumerate(PROMPTS[:10]):
        cfg = GenerationConfig(max_new_tokens=NEW, sampling=sampling, seed=i)
        expected = engine.generate(prompt, cfg).tokens
        got = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, decoding="heads",
                                                       tree=TREES[i % 3], sampling=sampling,
                                                       seed=i))
        assert got.tokens == expected


def test_a_batch_equals_each_sequence_alone(engines, plain):
    """Continuous batching (chunked prompts, several slots, mixed modes) changes no token."""
    engine = engines[True]
    modes = [("plain", None), ("heads", TREES[1]), ("draft", None), ("plain", None)]
    cfgs = [GenerationConfig(max_new_tokens=NEW, sampling=GREEDY, decoding=d, tree=t)
            for d, t in modes]
    for first in range(0, len(PROMPTS), 4):
        got = engine.generate_batch(PROMPTS[first:first + 4], cfgs, prefill_chunk=48)
        assert [r.tokens for r in got] == plain[first:first + 4]
