"""Random-weight Orpheus checkpoints and SNAC codecs in the real layouts, written as a download
would be: tests and benchmarks load them with `--bundle DIR --codec DIR` exactly like real ones.

- codec: SNAC 24 kHz at its published config (hubertsiuzdak/snac_24khz `config.json`, as quoted by
  mlx-audio's SNAC test and llama.cpp's converter; 19.8 M parameters), seeded weights,
  `config.json` + `pytorch_model.bin`.
- checkpoint: a Llama with Orpheus's vocabulary (156940), special ids, tied embeddings and llama3
  rope scaling, but a small hidden size and few layers (a 3B model does not fit a test); bf16
  weights in safetensors shards with an index; a `tokenizer.json` (byte-level: every byte its own
  token, ids 0-255) whose BOS post-processor and added tokens sit at the real ids (128000,
  128009, <custom_token_N> = 128256 + N).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.llama import LlamaConfig, LlamaForCausalLM, hf_parameter_names, init_weights
from models.voices import orpheus

SNAC_24KHZ = {"sampling_rate": 24000, "encoder_dim": 48, "encoder_rates": [2, 4, 8, 8],
              "decoder_dim": 1024, "decoder_rates": [8, 8, 4, 2], "attn_window_size": None,
              "codebook_size": 4096, "codebook_dim": 8, "vq_strides": [4, 2, 1], "noise": True,
              "depthwise": True}
# orpheus-3b-0.1-ft's config.json, less its size (hidden 3072, 28 layers, 24 / 8 heads)
ORPHEUS_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                  "vocab_size": 156940, "bos_token_id": orpheus.BEGIN_OF_TEXT,
                  "eos_token_id": orpheus.END_OF_TEXT, "tie_word_embeddings": True,
                  "rope_theta": 500000.0, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                  "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192},
                  "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
                  "torch_dtype": "bfloat16"}
CUSTOM_TOKENS = orpheus.SLOTS * orpheus.CODES + 11  # <custom_token_0> … as Orpheus's pretraining adds


def build_random_codec(path: str | Path, seed: int = 0) -> Path:
    """A SNAC 24 kHz directory with seeded random weights."""
    from snac import SNAC

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = SNAC(**SNAC_24KHZ).eval()
    (path / "config.json").write_text(json.dumps(SNAC_24KHZ, indent=2))
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def random_orpheus_model(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                         num_kv_heads: int = 2, intermediate_size: int = 128, seed: int = 0,
                         std: float = 0.2) -> LlamaForCausalLM:
    raw = {**ORPHEUS_CONFIG, "hidden_size": hidden_size, "num_hidden_layers": num_layers,
           "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
           "intermediate_size": intermediate_size}
    model = LlamaForCausalLM(LlamaConfig.from_dict(raw))
    init_weights(model, std=std, seed=seed)
    return model.eval()


def save_checkpoint(model: LlamaForCausalLM, path: str | Path, shards: int = 2,
                    dtype: torch.dtype = torch.bfloat16, tokenizer: bool = True) -> Path:
    """config.json, `shards` safetensors files with model.safetensors.index.json (as Hugging Face
    writes a large model), and tokenizer.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = model.config.to_dict()
    raw.update(torch_dtype=str(dtype).removeprefix("torch."), eos_token_id=orpheus.END_OF_TEXT)
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    own = dict(model.named_parameters())
    names = [name for name in hf_parameter_names(model.config)
             if not (name == "lm_head.weight" and model.config.tie_word_embeddings)]
    weight_map, total = {}, 0
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: own[name].detach().to(dtype).contiguous() for name in names[i::shards]}
        save_file(part, str(path / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer:
        write_tokenizer(path / "tokenizer.json")
    return path


def write_tokenizer(path: Path) -> None:
    """A byte-level tokenizer.json with Llama 3's BOS post-processor and Orpheus's added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    # the model's vocabulary fills ids 0 .. 127999 as Llama 3's does (added tokens are numbered
    # after it): the 256 byte symbols, then fillers that no text produces (no merges)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"<filler_{i}>": i for i in range(len(alphabet), orpheus.BEGIN_OF_TEXT)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    raw = json.loads(tok.to_str())
    # Llama 3's specials 128000 .. 128255 (reserved ones unnamed here), then Orpheus's custom tokens
    specials = {i: f"<|reserved_special_token_{i - orpheus.BEGIN_OF_TEXT}|>"
                for i in range(orpheus.BEGIN_OF_TEXT, orpheus.CUSTOM_TOKEN_BASE)}
    specials.update({orpheus.BEGIN_OF_TEXT: "<|begin_of_text|>", orpheus.END_OF_TEXT: "<|eot_id|>"})
    specials.update({orpheus.CUSTOM_TOKEN_BASE + n: f"<custom_token_{n}>"
                     for n in range(CUSTOM_TOKENS)})
    raw["added_tokens"] = [{"id": i, "content": c, "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": False, "special": True}
                           for i, c in sorted(specials.items())]
    raw["post_processor"] = json.loads(processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", orpheus.BEGIN_OF_TEXT)]).__getstate__())
    path.write_text(json.dumps(raw))


def build_random_orpheus(path: str | Path, seed: int = 0, **model_kwargs) -> Path:
    """A random Orpheus-layout checkpoint directory (see the module docstring)."""
    return save_checkpoint(random_orpheus_model(seed=seed, **model_kwargs), path)
