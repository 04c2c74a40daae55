"""Our decoder against Hugging Face transformers on the same weights."""

import pytest
import torch

from engine.engine import Engine
from engine.kv_cache import KVCache
from engine.types import GenerationConfig
from models.bundle import load_bundle
from models.llama import LlamaConfig, LlamaForCausalLM, init_weights

transformers = pytest.importorskip("transformers")


def full_logits(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    cfg = model.config
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 128, cfg.head_dim)
    slot = cache.allocate()
    layout = cache.layout([slot], [list(range(-1, len(ids) - 1))])
    with torch.no_grad():
        return model.logits(model(torch.tensor([ids]), cache, layout))[0]  # (T, V)


@pytest.fixture(scope="module")
def gqa_config():
    return LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=8, num_key_value_heads=2, rope_theta=500.0,
                       rms_norm_eps=1e-5, eos_token_id=(7,))


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused-projections"])
def test_logits_match_transformers(tmp_path, gqa_config, fused):
    ours = LlamaForCausalLM(gqa_config)
    init_weights(ours, std=0.1, seed=3)
    ours.save_pretrained(tmp_path)
    if fused:  # what the engine runs: q/k/v and gate/up as one matmul each
        ours.fuse_projections()
        assert set(ours.state_dict()) == set(LlamaForCausalLM(gqa_config).state_dict())
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    theirs.eval()
    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids).logits[0]
    got = full_logits(ours, ids[0].tolist())
    assert (got - expected).abs().max().item() <= 1e-4


def test_bare_transformers_directory_loads_and_decodes(tmp_path):
    hf_cfg = transformers.LlamaConfig(vocab_size=77, hidden_size=48, intermediate_size=80,
                                      num_hidden_layers=2, num_attention_heads=6,
                                      num_key_value_heads=3, eos_token_id=5, bos_token_id=1,
                                      tie_word_embeddings=True)
    torch.manual_seed(1)
    theirs = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path)
    engine = Engine(load_bundle(tmp_path), max_batch=1, max_len=64)
    prompt = [1, 9, 12, 40, 3]
    ours = engine.generate(prompt, GenerationConfig(max_new_tokens=20, decoding="plain")).tokens
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                              attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert ours == out[0, len(prompt):].tolist()


def test_prefill_then_incremental_equals_full_forward(gqa_config):
    model = LlamaForCausalLM(gqa_config)
    init_weights(model, std=0.1, seed=4)
    ids = torch.randint(0, 101, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    full = full_logits(model, ids)
    cfg = model.config
    cache = KVCache(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 64, cfg.head_dim)
    cache.allocate()
    slot = cache.allocate()  # not slot 0: slots must not leak into each other
    rows = []
    with torch.no_grad():
        for chunk in (ids[:12], ids[12:13], ids[13:20], *[[t] for t in ids[20:]]):
            layout = cache.layout([slot], [list(range(-1, len(chunk) - 1))])
            rows.append(model.logits(model(torch.tensor([chunk]), cache, layout))[0])
            cache.commit(slot, list(range(len(chunk))))
    assert torch.allclose(torch.cat(rows), full, atol=1e-5)


@pytest.mark.parametrize("slots", [[0, 2], [3, 1, 0], [0, 7]], ids=["gap", "unordered-gap", "gather"])
def test_batched_forward_over_scattered_slots_equals_each_alone(gqa_config, slots):
    """Sequences in slots with gaps between them (a view with idle rows) or far apart (a gathered
    copy) give the logits each gets alone; the other slots' entries stay as they were."""
    model = LlamaForCausalLM(gqa_config)
    init_weights(model, std=0.1, seed=5)
    model.fuse_projections()
    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 101, (n,), generator=gen).tolist() for n in (9, 4, 13)][:len(slots)]
    nxt = [torch.randint(0, 101, (n,), generator=gen).tolist() for n in (1, 3, 2)][:len(slots)]
    cache = KVCache(cfg.num_hidden_layers, 8, cfg.num_key_value_heads, 64, cfg.head_dim)
    cache.k.normal_(generator=gen)  # stale entries everywhere: nothing may read them
    cache.v.normal_(generator=gen)
    for _ in range(8):
        cache.allocate()
    alone = []
    with torch.no_grad():
        for s, p, n in zip(slots, prompts, nxt):
            layout = cache.layout([s], [list(range(-1, len(p) - 1))])
            model(torch.tensor([p]), cache, layout)
            cache.commit(s, list(range(len(p))))
            layout = cache.layout([s], [list(range(-1, len(n) - 1))])
            alone.append(model.logits(model(torch.tensor([n]), cache, layout))[0])
        untouched = cache.k[:, [x for x in range(8) if x not in slots]].clone()
        layout = cache.layout(slots, [list(range(-1, len(n) - 1)) for n in nxt])
        far = slots == [0, 7]  # 8 slots spanned by 2 sequences: gathered, not viewed
        assert (layout.slot_range is None) == far and (layout.members is None) == far
        width = max(map(len, nxt))
        ids = torch.tensor([n + [0] * (width - len(n)) for n in nxt])
        batched = model.logits(model(ids, cache, layout))
    for b, n in enumerate(nxt):
        assert torch.allclose(batched[b, :len(n)], alone[b], atol=1e-5)
    assert torch.equal(cache.k[:, [x for x in range(8) if x not in slots]], untouched)
