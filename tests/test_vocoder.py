"""Causal Vocos vocoder: shapes, causality bound, streaming == offline, save/load, training smoke run."""

from pathlib import Path

import numpy as np
import pytest
import torch

from models.recipes.train_vocoder import CropSampler, load_corpus, main as train_main, resynthesize
from models.vocoder import CausalVocos, StreamingVocoder, VocoderConfig, push_many

TINY = dict(num_tokens=16, dim=32, intermediate=64, num_blocks=2, kernel=7)
HOP = 441


@pytest.fixture(scope="module")
def tiny() -> CausalVocos:
    torch.manual_seed(0)
    model = CausalVocos(VocoderConfig(**TINY), centroids=torch.randn(16, 80) - 4).eval()
    with torch.no_grad():  # larger layer scales and head weights: make every path visibly non-zero
        for block in model.blocks:
            block.gamma.fill_(0.5)
        model.head.out.weight.mul_(20)
    return model


def test_output_length(tiny):
    with torch.no_grad():
        for t in (1, 2, 7, 50):
            assert tiny(torch.randint(0, 16, (2, t))).shape == (2, t * HOP)
            assert tiny.forward_mel(torch.randn(2, t, 80)).shape == (2, t * HOP)
    assert resynthesize(tiny, [1, 2, 3]).shape == (3 * HOP,)


def test_config_and_bounds(tiny):
    cfg = VocoderConfig()
    assert VocoderConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.overlap_samples == 661 and cfg.receptive_field_frames == 55
    sv = StreamingVocoder(tiny)
    assert sv.lookahead_samples == 661 and abs(sv.lookahead_ms - 29.977) < 1e-2
    assert sv.receptive_field_frames == 1 + 6 * 3


def test_causality(tiny):
    """Token t changes audio only from sample t*hop - 661 on (the ISTFT's "same" padding); the periodic
    Hann window is 0 at its first sample, so sample t*hop - 661 itself is untouched too."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 16, (1, 30), generator=g)
    with torch.no_grad():
        ya = tiny(a)[0]
        for t in (0, 1, 5, 17, 29):
            b = a.clone()
            b[0, t] = (a[0, t] + 1) % 16
            diff = (tiny(b)[0] - ya).abs()
            bound = max(0, t * HOP - 661)
            assert diff[:bound + 1].max().item() < 1e-6 if bound else True
            assert diff[bound + 1:bound + 1 + HOP].max().item() > 1e-4  # the bound is tight
    with torch.no_grad():  # and the same for the mel path: frame t never reaches before t*hop - 661
        m = torch.randn(1, 20, 80) - 4
        m2 = m.clone()
        m2[0, 10] += 1.0
        diff = (tiny.forward_mel(m2) - tiny.forward_mel(m))[0].abs()
        assert diff[:10 * HOP - 660].max().item() < 1e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_equals_offline(tiny, seed):
    rng = np.random.default_rng(seed)
    sv = StreamingVocoder(tiny)
    for _ in range(2):  # two utterances: flush() resets the stream
        total = int(rng.integers(60, 200))
        tokens = rng.integers(0, 16, total)
        with torch.no_grad():
            ref = tiny(torch.as_tensor(tokens)[None])[0].numpy()
        sizes = [3, 7, 25, 1, 0] + list(rng.integers(0, 30, 100))
        outs, i = [], 0
        for n in sizes:
            if i >= total:
                break
            chunk = tokens[i:i + n]
            i += len(chunk)
            outs.append(sv.push(chunk.tolist() if n % 2 else torch.as_tensor(chunk)))
            # everything before T*hop - lookahead is out, nothing after it
            assert sum(len(o) for o in outs) == max(0, i * HOP - 661)
        outs.append(sv.flush())
        got = np.concatenate(outs)
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-4
        assert np.abs(ref).max() > 1e-3
        assert sv._feats.shape[1] == 0 and sv.num_frames == 0


def test_pushing_several_streams_at_once_equals_each_alone(tiny):
    """One batched pass for streams at different points of different utterances (one fresh, one
    pushing nothing this time, lengths differing): the same samples as each stream alone."""
    rng = np.random.default_rng(3)
    utterances = [rng.integers(0, 16, n) for n in (90, 60, 120)]
    together = [StreamingVocoder(tiny) for _ in utterances]
    alone = [StreamingVocoder(tiny) for _ in utterances]
    done = [0] * len(utterances)
    got = [[] for _ in utterances]
    want = [[] for _ in utterances]
    start = [0, 0, 4]  # the third stream joins later (its state starts as None)
    for step in range(40):
        chunks = []
        for i, u in enumerate(utterances):
            n = 0 if step < start[i] or (i == 1 and step % 3 == 0) else int(rng.integers(1, 9))
            chunks.append(u[done[i]:done[i] + n])
            done[i] += len(chunks[-1])
        for i, out in enumerate(push_many(together, chunks)):
            got[i].append(out)
        for i, (sv, chunk) in enumerate(zip(alone, chunks)):
            want[i].append(sv.push(chunk))
    for i, u in enumerate(utterances):
        got[i].append(together[i].flush())
        want[i].append(alone[i].flush())
        a, b = np.concatenate(got[i]), np.concatenate(want[i])
        assert a.shape == b.shape == (done[i] * HOP,) and np.abs(a - b).max() < 1e-5
        with torch.no_grad():
            ref = tiny(torch.as_tensor(u[:done[i]])[None])[0].numpy()
        assert np.abs(a - ref).max() < 1e-4


def test_streaming_cost_is_bounded(tiny):
    """The stream keeps only the few feature frames the ISTFT still needs, not the history."""
    sv = StreamingVocoder(tiny)
    for _ in range(40):
        sv.push(list(range(10)))
    assert sv.num_frames == 400 and sv._feats.shape[1] <= 10 + 4


def test_save_load_round_trip(tiny, tmp_path):
    tiny.save(tmp_path / "voc")
    assert (tmp_path / "voc" / "vocoder.safetensors").exists() and (tmp_path / "voc" / "vocoder.json").exists()
    loaded = CausalVocos.load(tmp_path / "voc", "cpu")
    assert loaded.cfg == tiny.cfg
    x = torch.randint(0, 16, (2, 40))
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny(x))


def write_fake_shards(root: Path, num_tokens: int = 16) -> None:
    """Each token is a tone (its own frequency), so the audio is predictable from the tokens."""
    rng = np.random.default_rng(0)
    (root / "shards").mkdir(parents=True)
    np.save(root / "codebook.npy", rng.normal(-4, 1, (num_tokens, 80)).astype(np.float32))
    freqs = 150.0 * (1 + np.arange(num_tokens))
    for name, count in (("train-0000", 5), ("train-0001", 5), ("valid-0000", 3)):
        audio, tokens = [], []
        for _ in range(count):
            frames = int(rng.integers(55, 120))
            tok = np.repeat(rng.integers(0, num_tokens, frames // 5 + 1), 5)[:frames]
            phase = np.cumsum(2 * np.pi * np.repeat(freqs[tok], HOP) / 22050)
            audio.append((0.3 * np.sin(phase) * 32767).astype(np.int16))
            tokens.append(tok.astype(np.int16))
        offsets = lambda xs: np.cumsum([0] + [len(x) for x in xs]).astype(np.int64)  # noqa: E731
        np.savez(root / "shards" / f"{name}.npz", audio=np.concatenate(audio), audio_offsets=offsets(audio),
                 tokens=np.concatenate(tokens), token_offsets=offsets(tokens),
                 text=np.array(["x"] * count))


def test_load_corpus_max_hours(tmp_path):
    write_fake_shards(tmp_path)
    full = load_corpus(tmp_path, "train")
    assert len(full.utts) == 10 and len(full.audio) == 2
    first = int(full.utts[0, 3])
    part = load_corpus(tmp_path, "train", max_hours=(first + 1) / 50 / 3600)  # reaches into utterance 2
    assert len(part.utts) == 2 and len(part.audio) == 1
    assert len(part.audio[0]) == part.utts[:, 3].sum() * HOP


def test_gta_crops_take_the_lm_tokens_where_a_shard_has_them(tmp_path):
    """--gta-mix: that share of crops reads data/gta/<shard>.npy (the LM's tokens for the same frames)
    instead of the true tokens; a shard without the file always gives its true tokens, and the audio
    is the true audio either way."""
    write_fake_shards(tmp_path)
    (tmp_path / "gta").mkdir()
    n0 = int(np.load(tmp_path / "shards" / "train-0000.npz")["tokens"].shape[0])
    np.save(tmp_path / "gta" / "train-0000.npy", np.full(n0, 15, dtype=np.int16))  # the "LM" says 15
    corpus = load_corpus(tmp_path, "train")
    assert corpus.gta[0] is not None and corpus.gta[1] is None

    def lm_share(mix: float) -> float:
        inputs, audio = CropSampler(corpus, 50, HOP, "tokens", seed=0, gta_mix=mix).sample(400)
        assert audio.shape == (400, 50 * HOP) and audio.abs().max() > 0.1
        return float((inputs == 15).all(-1).float().mean())

    assert lm_share(0.0) == 0.0
    share_of_shard0 = float(corpus.utts[:5, 3].sum() - 49 * 5) / float(corpus.utts[:, 3].sum() - 49 * 10)
    assert abs(lm_share(1.0) - share_of_shard0) < 0.1  # every crop of shard 0, none of shard 1
    assert abs(lm_share(0.5) - share_of_shard0 / 2) < 0.1


def test_training_smoke_and_resume(tmp_path, capsys):
    write_fake_shards(tmp_path / "data")
    common = ["--data", str(tmp_path / "data"), "--ckpt", str(tmp_path / "ckpt"), "--out",
              str(tmp_path / "out"), "--batch", "8", "--warmup", "3", "--lr", "3e-3", "--log-every", "10",
              "--model", '{"num_tokens": 16, "dim": 32, "intermediate": 64, "num_blocks": 2}']
    first = train_main(common + ["--total-steps", "15"])
    assert first["start_step"] == 0 and first["step"] == 15
    assert (tmp_path / "ckpt" / "last.pt").exists()
    second = train_main(common + ["--total-steps", "30"])
    assert second["start_step"] == 15 and second["step"] == 30
    assert "resumed" in capsys.readouterr().out
    losses = first["losses"] + second["losses"]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert set(second["valid"]) == {"mel", "sc", "mag", "total"}
    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert ckpt["step"] == 30
    exported = CausalVocos.load(tmp_path / "out")
    assert exported.cfg.dim == 32
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in exported.state_dict().items())
