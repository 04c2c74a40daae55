"""Causal Vocos vocoder: shapes, causality bound, streaming == offline, save/load, training smoke run."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from models.recipes.train_vocoder import CropSampler, load_corpus, main as train_main, resynthesize
from models.streaming_vocoder import StreamingVocoder, prepared, push_many
from models.vocoder import CausalVocos, VocoderConfig

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
        assert sv.num_frames == 0 and sv._context is None  # flush() reset the stream


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
    """The stream keeps only each conv's last kernel - 1 inputs and the overlap-add tail the ISTFT's
    later frames still reach (n_fft - hop samples), not the history."""
    sv = StreamingVocoder(tiny)
    for _ in range(40):
        sv.push(list(range(10)))
    cfg = tiny.cfg
    assert sv.num_frames == 400 and sv._tail.size == cfg.n_fft - cfg.hop
    assert sv._context.shape == (cfg.kernel - 1, cfg.n_mels + cfg.dim * cfg.num_blocks)


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


def push_in_rounds(model, utterances, schedules, rounds: int) -> list[np.ndarray]:
    """Every stream pushed its next chunk (schedule[r % len]) in one batched pass per round; a
    stream whose utterance is done flushes it and starts the next one (a list of utterances per
    stream). Returns each stream's audio, utterance after utterance."""
    streams = [StreamingVocoder(model) for _ in utterances]
    place = [[0, 0] for _ in utterances]  # (utterance, frames pushed of it)
    audio = [[] for _ in utterances]
    for r in range(rounds):
        chunks = []
        for (u, done), utts, sched in zip(place, utterances, schedules):
            n = sched[r % len(sched)] if u < len(utts) else 0
            chunks.append(utts[u][done:done + n] if u < len(utts) else [])
        for i, out in enumerate(push_many(streams, chunks)):
            audio[i].append(out)
            place[i][1] += len(chunks[i])
            u, done = place[i]
            if u < len(utterances[i]) and done == len(utterances[i][u]):
                audio[i].append(streams[i].flush())
                place[i] = [u + 1, 0]
    assert all(u == len(utts) for (u, _), utts in zip(place, utterances)), "rounds too few"
    return [np.concatenate(a) for a in audio]


def test_many_streams_of_different_chunk_sizes_in_one_pass_equal_offline(tiny):
    """Twelve streams in the same batched passes, each with its own chunk sizes (single frames,
    fewer frames than a conv's context, more than the receptive field, pauses, a late start), some
    speaking a second utterance after their flush: each stream's audio equals offline decoding of
    each of its utterances."""
    rng = np.random.default_rng(7)
    schedules = [[1], [2], [3], [5], [6, 6, 9, 13, 20, 30, 40], [7], [0, 0, 0, 8], [13], [40], [1, 0],
                 list(rng.integers(0, 12, 17)) + [1], [4, 25, 2]]
    utterances = [[rng.integers(0, 16, int(n)) for n in rng.integers(20, 90, 1 + i % 2)]
                  for i in range(len(schedules))]
    got = push_in_rounds(tiny, utterances, schedules, rounds=400)
    for audio, utts in zip(got, utterances):
        with torch.no_grad():
            want = np.concatenate([tiny(torch.as_tensor(u)[None])[0].numpy() for u in utts])
        assert audio.shape == want.shape and np.abs(audio - want).max() < 1e-5


def test_a_pass_replaces_the_state_so_a_shallow_copy_is_a_snapshot(tiny):
    """The service retries a failed batched pass stream by stream from shallow copies of the
    decoders taken before it (`engine.serving.vocoding`): a pass must replace a decoder's state,
    never change it in place. Restored after a pass, a decoder gives that pass's samples again and
    goes on to the offline audio."""
    rng = np.random.default_rng(11)
    tokens = [rng.integers(0, 16, 60) for _ in range(3)]
    streams = [StreamingVocoder(tiny) for _ in tokens]
    first = push_many(streams, [t[:20] for t in tokens])
    saved = [copy.copy(s) for s in streams]
    second = push_many(streams, [t[20:27] for t in tokens])
    for s, before in zip(streams, saved):
        vars(s).update(vars(before))
    again = push_many(streams, [t[20:27] for t in tokens])
    for a, b in zip(second, again):
        assert np.array_equal(a, b)
    for i, (s, t) in enumerate(zip(streams, tokens)):
        audio = np.concatenate([first[i], again[i], s.push(t[27:]), s.flush()])
        with torch.no_grad():
            assert np.abs(audio - tiny(torch.as_tensor(t)[None])[0].numpy()).max() < 1e-5


def test_plain_linears_give_the_samples_of_reordered_ones(tiny, monkeypatch):
    """Off the CPU's oneDNN path (another device, no mkldnn) the pass uses torch's F.linear: the same
    samples to float rounding."""
    rng = np.random.default_rng(5)
    utterances = [[rng.integers(0, 16, 70)] for _ in range(4)]
    schedules = [[3], [6, 9], [1, 4], [11]]
    packed = push_in_rounds(tiny, utterances, schedules, rounds=80)
    assert prepared(tiny).head.packed is not None or not torch.backends.mkldnn.is_available()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    plain_model = copy.deepcopy(tiny)  # its own prepared weights, built without mkldnn
    assert prepared(plain_model).head.packed is None
    plain = push_in_rounds(plain_model, utterances, schedules, rounds=80)
    for a, b in zip(packed, plain):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5


def test_new_streams_follow_weights_changed_in_place(tiny):
    """A model's prepared weights are rebuilt when its parameters change (loading, fine-tuning):
    a stream started after the change decodes with the new weights."""
    model = copy.deepcopy(tiny)
    tokens = np.random.default_rng(2).integers(0, 16, 40)
    before = StreamingVocoder(model)
    with torch.no_grad():
        model.blocks[0].pwconv1.weight.mul_(1.5)
        want = model(torch.as_tensor(tokens)[None])[0].numpy()
    after = StreamingVocoder(model)
    assert after.prepared is not before.prepared
    audio = np.concatenate([after.push(tokens), after.flush()])
    assert np.abs(audio - want).max() < 1e-5


@pytest.mark.cuda
def test_streaming_on_cuda_equals_offline_there(tiny):
    """On CUDA the pass runs torch's F.linear on the device and overlap-adds on the host. Offline
    decoding's convolutions there use TF32 by default (cuDNN; the pass's linears do not), so the
    reference is taken without cuDNN, in full float32."""
    model = copy.deepcopy(tiny).to("cuda")
    assert prepared(model).head.packed is None
    rng = np.random.default_rng(9)
    utterances = [[rng.integers(0, 16, 50)] for _ in range(3)]
    got = push_in_rounds(model, utterances, [[1], [6, 9], [13]], rounds=60)
    for audio, [u] in zip(got, utterances):
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=False):
            want = model(torch.as_tensor(u, device="cuda")[None])[0].cpu().numpy()
        assert audio.shape == want.shape and np.abs(audio - want).max() < 1e-4
