"""The learned tokenizer (FSQ mel encoder) and its vocoder: serving reads what training wrote."""

import numpy as np
import torch

from models.codec import FSQ, EncoderConfig, MelEncoder, fold_into_vocoder
from models.recipes.train_codec import Codec
from models.vocoder import VocoderConfig

SMALL_ENC = EncoderConfig(dim=32, intermediate=64, num_blocks=2, levels=(5, 4, 3))
SMALL_VOC = VocoderConfig(dim=32, intermediate=64, num_blocks=2)


def test_fsq_codes_name_their_values():
    fsq = FSQ((7, 5, 4))
    values, codes = fsq(torch.randn(4096, 3) * 3)
    assert codes.min() >= 0 and codes.max() < fsq.num_codes == 140
    assert torch.equal(fsq.values(codes), values)
    table = fsq.values(torch.arange(fsq.num_codes))  # every code: a distinct point in [-1, 1]^3
    assert len(torch.unique(table, dim=0)) == fsq.num_codes and table.abs().max() <= 1


def test_straight_through_gradient_reaches_the_encoder():
    enc = MelEncoder(SMALL_ENC)
    values, _ = enc(torch.randn(2, 20, 80))
    values.sum().backward()
    assert enc.conv_in.weight.grad is not None and enc.conv_in.weight.grad.abs().sum() > 0


def test_folded_vocoder_renders_the_training_path():
    torch.manual_seed(0)
    codec = Codec(SMALL_ENC, SMALL_VOC).eval()
    mel = torch.randn(1, 60, 80)
    with torch.no_grad():
        audio, codes = codec(mel, margin=0)
        served = fold_into_vocoder(codec.vocoder, codec.embedding)(codes)
    assert served.shape == audio.shape == (1, 60 * 441)
    assert torch.allclose(served, audio, atol=1e-5)


def test_crop_codes_equal_the_whole_utterance_codes_inside_the_margin():
    torch.manual_seed(1)
    enc = MelEncoder(SMALL_ENC).eval()
    margin = 16  # the training crops' context on each side (train_codec default)
    mel = np.random.default_rng(0).standard_normal((200, 80)).astype(np.float32)
    whole = enc.encode(mel)
    t0, crop = 70, 50
    with torch.no_grad():
        part = enc(torch.from_numpy(mel[t0 - margin:t0 + crop + margin])[None])[1][0, margin:-margin]
    assert np.array_equal(part.numpy(), whole[t0:t0 + crop])
