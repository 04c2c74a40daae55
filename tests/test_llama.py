"""Our decoder against Hugging Face transformers on the same weights."""

import pytest
import torch

from engine.decoding.engine import Engine
from engine.types import GenerationConfig
from models import runners
from models.kv_cache import KVCache
from models.llama import LlamaConfig, LlamaForCausalLM, init_weights
from models.voices.bundle import load_bundle

transformers = pytest.importorskip("transformers")


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) of every position, through a model's forward or a runner's."""
    cfg = model.config if isinstance(model, LlamaForCausalLM) else model.model.config
    forward = model if isinstance(model, LlamaForCausalLM) else model.forward
    cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 128, cfg.head_dim)
    slot = cache.allocate()
    layout = cache.layout([slot], [list(range(-1, len(ids) - 1))])
    with torch.no_grad():
        return model.logits(forward(torch.tensor([ids]), cache, layout)[0])  # (T, V)


@pytest.fixture(scope="module")
def gqa_config():
    return LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                       num_attention_heads=8, num_key_value_heads=2, rope_theta=500.0,
                       rms_norm_eps=1e-5, eos_token_id=(7,))


@pytest.mark.parametrize("runner", ["", "torch", "compiled-cpu"],
                         ids=["training-forward", "torch-runner", "compiled-cpu-runner"])
def test_logits_match_transformers(tmp_path, gqa_config, runner):
    ours = LlamaForCausalLM(gqa_config)
    init_weights(ours, std=0.1, seed=3)
    ours.save_pretrained(tmp_path)
    model = ours
    if runner:  # what the engine runs: fused weights, through the torch or the compiled runner
        model = runners.model_runner(runner, ours)
        assert model.name == runner
        assert set(ours.state_dict()) == set(LlamaForCausalLM(gqa_config).state_dict())
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32)
    theirs.eval()
    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids).logits[0]
    got = full_logits(model, ids[0].tolist())
    assert (got - expected).abs().max().item() <= 1e-4


def twins(config, seed: int, slots: int, monkeypatch):
    """The same weights twice, torch forward and compiled decoder, a cache each with `slots` slots,
    and the list the compiled decoder's calls go to (their input shapes)."""
    torch_model, compiled = LlamaForCausalLM(config), LlamaForCausalLM(config)
    init_weights(torch_model, std=0.1, seed=seed)
    compiled.load_state_dict(torch_model.state_dict())
    torch_model, compiled = (runners.TorchRunner(torch_model), runners.CompiledCpuRunner(compiled))
    caches = [KVCache(config.num_hidden_layers, slots, config.num_key_value_heads, 64,
                      config.head_dim) for _ in range(2)]
    calls = []
    decode = compiled.compiled.forward
    monkeypatch.setattr(compiled.compiled, "forward",
                        lambda ids, *a: calls.append(tuple(ids.shape)) or decode(ids, *a))
    return torch_model, compiled, caches, calls


def test_compiled_runner_equals_the_torch_runner(gqa_config, monkeypatch):
    """A prompt, chains of 1-5 tokens and a tree block (tree attention) of one sequence: the numpy
    forward gives the torch forward's hidden states and writes the same cache entries; a long block
    still goes through torch."""
    torch_model, numpy_model, caches, calls = twins(gqa_config, 6, 3, monkeypatch)
    cfg = torch_model.model.config
    for cache in caches:
        cache.allocate(), cache.allocate()
    gen = torch.Generator().manual_seed(3)
    chain = lambda n: list(range(-1, n - 1))  # noqa: E731
    blocks = [(chain(7), None), (chain(1), None), (chain(2), None), (chain(3), None),
              ([-1, 0, 0, 1, 2, 1], [0, 1, 4]), (chain(5), None), (chain(33), None)]  # (parents, kept path)
    with torch.no_grad():
        for parents, keep in blocks:
            ids = torch.randint(0, 101, (1, len(parents)), generator=gen)
            hidden = []
            for model, cache in zip((torch_model, numpy_model), caches):
                hidden.append(model.forward(ids, cache, cache.layout([1], [parents])))
                cache.commit(1, keep if keep is not None else list(range(len(parents))))
            assert hidden[0].shape == hidden[1].shape == (1, len(parents), cfg.hidden_size)
            assert (hidden[0] - hidden[1]).abs().max() <= 1e-5
        assert [t for _, t in calls] == [7, 1, 2, 3, 6, 5]  # the 33-token block went through torch
        n = caches[0].lengths[1]
        assert n == 7 + 1 + 2 + 3 + 3 + 5 + 33
        for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
            assert (a[:, 1, :, :n] - b[:, 1, :, :n]).abs().max() <= 1e-5
            assert a[:, 0].abs().max() == b[:, 0].abs().max() == 0  # the other slot untouched
    with torch.enable_grad():  # training runs the model itself: the torch forward
        ids = torch.tensor([[1, 2, 3]])
        layout = caches[1].layout([0], [[-1, 0, 1]])
        assert numpy_model.model(ids, caches[1], layout).requires_grad


def test_compiled_decoder_batches_sequences_like_the_torch_forward(gqa_config, monkeypatch):
    """Continuous batching: several sequences in one forward, each at its own length, blocks of
    different sizes (padded), a tree among them, slots with a gap: the compiled forward gives the
    torch forward's hidden states (padding rows zero) and cache entries, slot by slot."""
    torch_model, compiled, caches, calls = twins(gqa_config, 8, 5, monkeypatch)
    cfg = torch_model.model.config
    gen = torch.Generator().manual_seed(4)
    chain = lambda n: list(range(-1, n - 1))  # noqa: E731
    steps = [  # (slots, each slot's block)
        ([0, 1, 2, 3, 4], [chain(9), chain(3), chain(5), chain(1), chain(4)]),  # prefill, ragged
        ([0, 2, 3], [chain(1), [-1, 0, 0, 1], chain(2)]),  # slot 1 idle (a gap), a tree in slot 2
        ([0, 1, 2, 3, 4], [chain(1)] * 5),  # plain decoding: one token each
        ([4, 1], [chain(1), chain(1)]),
    ]
    with torch.no_grad():
        for slots, blocks in steps:
            ids = torch.randint(0, 101, (len(slots), max(map(len, blocks))), generator=gen)
            hidden = []
            for model, cache in zip((torch_model, compiled), caches):
                layout = cache.layout(slots, blocks)
                assert layout.rows is not None
                hidden.append(model.forward(ids, cache, layout))
                for slot, block in zip(slots, blocks):
                    cache.commit(slot, list(range(len(block))))
            for b, block in enumerate(blocks):
                n = len(block)
                assert (hidden[0][b, :n] - hidden[1][b, :n]).abs().max() <= 1e-5
                assert not hidden[1][b, n:].any()  # padding rows zero
        assert len(calls) == len(steps)
        for slot in range(5):
            n = caches[0].lengths[slot]
            assert n == caches[1].lengths[slot] > 0
            for a, b in ((caches[0].k, caches[1].k), (caches[0].v, caches[1].v)):
                assert (a[:, slot, :, :n] - b[:, slot, :, :n]).abs().max() <= 1e-5


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


@pytest.mark.parametrize("bias", [False, True])
def test_parameter_names_are_transformers(bias):
    """`hf_parameter_names` lists transformers' parameters, and ours are the same."""
    from models.llama import hf_parameter_names

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=bias,
                      mlp_bias=bias)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_dict().items()
                                         if k not in ("torch_dtype", "eos_token_id")})
    theirs = {n for n, _ in transformers.LlamaForCausalLM(hf_cfg).named_parameters()}
    ours = {n for n, _ in LlamaForCausalLM(cfg).named_parameters()}
    assert set(hf_parameter_names(cfg)) == theirs == ours


def test_the_engine_chooses_its_runner_once(small_bundle):
    """auto takes the compiled CPU runner for a float32 bias-free model on the CPU; both runners
    decode the same tokens; an unknown runner is refused at load."""
    import copy

    auto = Engine(copy.deepcopy(small_bundle), max_batch=1, max_len=128)
    plain_torch = Engine(copy.deepcopy(small_bundle), max_batch=1, max_len=128, runner="torch")
    assert (auto.runner, plain_torch.runner) == ("compiled-cpu", "torch")
    assert (auto.heads_runner.name, plain_torch.heads_runner.name) == ("compiled-cpu", "torch")
    for decoding in ("plain", "heads", "draft"):
        cfg = GenerationConfig(max_new_tokens=20, decoding=decoding)
        assert auto.generate([1, 2, 3], cfg).tokens == plain_torch.generate([1, 2, 3], cfg).tokens
    with pytest.raises(ValueError, match="runner"):
        Engine(copy.deepcopy(small_bundle), runner="gpu")
