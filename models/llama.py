"""A Llama-family decoder (RMSNorm, rotary positions, SwiGLU, grouped-query attention).

Module and parameter names are Hugging Face's `LlamaForCausalLM`'s, so a `model.safetensors` written
by transformers loads name by name (`hf_parameter_names`) and ours loads in transformers.

The forward pass never owns a cache: it reads and writes the persistent `models.kv_cache.KVCache`
through a `models.kv_cache.BlockLayout` that says, for each sequence of the batch, which cache slot it
uses, where its new tokens go and which cached entries each new token may attend to (tree attention).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from models.invariant_attention import batch_invariant

HALF = (torch.bfloat16, torch.float16)  # float32's decode step skips the invariance check

if TYPE_CHECKING:
    from models.kv_cache import BlockLayout, KVCache


@dataclass(frozen=True)
class LlamaConfig:
    """The subset of Hugging Face's `LlamaConfig` that this decoder implements."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = field(default_factory=tuple)
    # Llama 3.1+'s frequency-dependent rope scaling, as (name, value) pairs of the config's
    # `rope_scaling` ("rope_type": "llama3"); empty: none
    rope_scaling: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_dict(cls, raw: dict) -> LlamaConfig:
        model_type = raw.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"unsupported model_type {model_type!r}: only 'llama' is implemented")
        scaling = raw.get("rope_scaling") or {}
        if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
            raise ValueError(f"rope_scaling {scaling!r} is not supported (only rope_type llama3)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported")
        eos = raw.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        names = {f for f in cls.__dataclass_fields__ if f not in ("eos_token_id", "rope_scaling")}
        kwargs = {k: raw[k] for k in names if k in raw and raw[k] is not None}
        kwargs.setdefault("num_key_value_heads", raw["num_attention_heads"])
        if scaling:
            kwargs["rope_scaling"] = tuple(sorted(
                (k, float(scaling[k])) for k in LLAMA3_SCALING_KEYS))
        return cls(eos_token_id=eos_ids, **kwargs)

    def to_dict(self) -> dict:
        raw = asdict(self)
        raw["eos_token_id"] = list(self.eos_token_id)
        raw["rope_scaling"] = {**dict(self.rope_scaling), "rope_type": "llama3"} if self.rope_scaling \
            else None
        raw.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                   torch_dtype="float32")
        return raw


LLAMA3_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
                       "original_max_position_embeddings")


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position_embeddings: float
                    ) -> torch.Tensor:
    """Llama 3.1's rope scaling of the rotary frequencies (head_dim/2,): wavelengths shorter than
    original/high_freq_factor keep their frequency, those longer than original/low_freq_factor are
    slowed by `factor`, and the band between blends the two linearly in original/wavelength."""
    wavelength = 2 * math.pi / inv_freq
    ratio = original_max_position_embeddings / wavelength  # periods within the original context
    blend = ((ratio - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    # blend 0 (long wavelengths): inv_freq / factor; blend 1 (short ones): inv_freq unchanged
    return inv_freq / factor * (1 - blend) + inv_freq * blend


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused op, same numbers
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """Rotary embedding, half-split layout as in transformers (`rotate_half`); cos/sin come from a
    table that grows (by doubling) to the longest span seen, so a step only gathers rows. The table
    keeps sin with the sign of `rotate_half` folded in (-sin on the first half), so applying it is a
    roll, two products and a sum."""

    def __init__(self, head_dim: int, theta: float, scaling: tuple[tuple[str, float], ...] = ()
                 ) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if scaling:
            inv_freq = llama3_inv_freq(inv_freq, **dict(scaling))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("table", torch.zeros(0, 2, head_dim), persistent=False)

    def forward(self, positions: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        # positions (B, T), all < span -> cos, signed sin (B, T, 1, head_dim)
        if self.table.shape[0] < span:
            n = max(span, 2 * self.table.shape[0], 256)
            pos = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq.float()  # (n, head_dim/2), float32 in any dtype
            emb = torch.cat((freqs, freqs), dim=-1)  # (n, head_dim)
            sign = torch.ones_like(emb)
            sign[:, :emb.shape[-1] // 2] = -1.0
            self.table = torch.stack((emb.cos(), emb.sin() * sign), dim=1)  # (n, 2, head_dim)
        rows = self.table[positions]  # (B, T, 2, head_dim)
        return rows[:, :, None, 0], rows[:, :, None, 1]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, hd); cos, signed_sin (B, T, 1, hd) from `Rotary`. Equals transformers'
    x * cos + rotate_half(x) * sin: rotate_half(x) = (-x2, x1) = roll(x, hd/2) * (-1 | +1).
    The float32 table is cast to x's dtype first, as transformers does (bf16 / fp16 weights)."""
    cos, signed_sin = cos.to(x.dtype), signed_sin.to(x.dtype)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def project(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ weight_t (in, out) [+ bias]: a linear layer with its weight stored transposed,
    which this machine's BLAS multiplies about 20 % faster than F.linear's (out, in) at 1-33 rows.
    In half precision on the CPU one row runs as two (itself twice, the first kept): a product
    gives a row the same bits at any 2+ rows, but the one-row product takes another kernel
    (gemv) whose bits differ, and exact speculation needs a token's bits not to depend on the
    rows beside it (with `models.invariant_attention`; docs/engine.md, 2026-12-07)."""
    if x.dtype in HALF and x.numel() == x.shape[-1] and batch_invariant(x.dtype, x.device):
        flat = x.reshape(1, -1)
        y = torch.matmul(torch.cat((flat, flat)), weight_t)[:1].view(*x.shape[:-1], -1)
    else:
        y = torch.matmul(x, weight_t)
    return y if bias is None else y + bias


def joined(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linears' weights side by side as one (in, sum of outs) matrix, and their biases, built
    from the parameters (differentiable: the training forward)."""
    weight_t = torch.cat([m.weight for m in linears]).t()
    return weight_t, None if linears[0].bias is None else torch.cat([m.bias for m in linears])


def transposed(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`joined` as a contiguous copy, made once when the weights are final (inference)."""
    with torch.no_grad():
        weight_t, bias = joined(*linears)
    return weight_t.contiguous(), bias


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=bias)
        # inference: q, k and v as one transposed matrix, o transposed (`fuse_projections`)
        self.register_buffer("qkv_t", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)
        self.register_buffer("o_t", None, persistent=False)
        self.register_buffer("o_bias", None, persistent=False)

    def fuse(self) -> None:
        self.qkv_t, self.qkv_bias = transposed(self.q_proj, self.k_proj, self.v_proj)
        self.o_t, self.o_bias = transposed(self.o_proj)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, layout: BlockLayout | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv, self.hd
        # the load-time copies (`fuse`), else the same matrices from the parameters (training)
        qkv_t, qkv_bias = (self.qkv_t, self.qkv_bias) if self.qkv_t is not None else joined(
            self.q_proj, self.k_proj, self.v_proj)
        o_t, o_bias = (self.o_t, self.o_bias) if self.o_t is not None else joined(self.o_proj)
        # one matmul, one rotary over q and k together
        qkv = project(x, qkv_t, qkv_bias).view(B, T, H + 2 * Hkv, hd)
        qk = apply_rotary(qkv[:, :, :H + Hkv], cos, sin)
        q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + Hkv:]  # (B, T, heads, hd) each
        if cache is None:  # training: a causal pass over whole sequences (right padding only)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), is_causal=True,
                                                 enable_gqa=H != Hkv)
            out = out.transpose(1, 2)  # (B, T, H, hd)
        else:  # k, v into the persistent cache; attention over what the layout lets each see
            out = cache.attend(self.layer_idx, layout, q, k, v)  # (B, T, H, hd)
        return project(out.reshape(B, T, H * hd), o_t, o_bias)  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        # inference: gate and up as one transposed matrix, down transposed (`fuse_projections`)
        self.register_buffer("gate_up_t", None, persistent=False)
        self.register_buffer("gate_up_bias", None, persistent=False)
        self.register_buffer("down_t", None, persistent=False)
        self.register_buffer("down_bias", None, persistent=False)

    def fuse(self) -> None:
        self.gate_up_t, self.gate_up_bias = transposed(self.gate_proj, self.up_proj)
        self.down_t, self.down_bias = transposed(self.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.gate_up_t is not None  # the load-time copies (`fuse`), else from the parameters
        gate_up_t, gate_up_bias = ((self.gate_up_t, self.gate_up_bias) if fused
                                   else joined(self.gate_proj, self.up_proj))
        down_t, down_bias = (self.down_t, self.down_bias) if fused else joined(self.down_proj)
        gate, up = project(x, gate_up_t, gate_up_bias).chunk(2, dim=-1)
        return project(F.silu(gate) * up, down_t, down_bias)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, layout):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layout)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """Embeddings, decoder layers and the final norm (transformers' `LlamaModel`)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("lm_head_t", None, persistent=False)  # inference (`fuse_projections`)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                layout: BlockLayout | None = None) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, hidden). With a cache, K/V of every input
        are written into it at `layout`'s positions and attention follows the layout's mask; without
        one (training), each row is a whole sequence from position 0, causally masked. The one torch
        forward: the engine runs it, or the compiled kernels, through a runner (`models.runners`)."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        if layout is None:
            cos, sin = self.model.rotary(torch.arange(T, device=input_ids.device)[None], T)
        elif layout.rows is None:
            cos, sin = self.model.rotary(layout.positions, layout.span)
        else:  # several sequences: only their real rows, packed as (1, R), go through the layers;
            # the (B, T) padding exists inside attention alone (`KVCache.attend`)
            real = layout.rows[0]  # (R,) row b * T + t of each real token
            x = x.view(B * T, -1).index_select(0, real)[None]  # (1, R, D)
            cos, sin = self.model.rotary(layout.positions.view(-1)[real][None], layout.span)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, layout)
        x = self.model.norm(x)
        if layout is not None and layout.rows is not None:  # back to (B, T, D), padding zero
            x = x.new_zeros(B * T, x.shape[-1]).index_copy_(0, layout.rows[0], x[0]).view(B, T, -1)
        return x

    def fuse_projections(self) -> LlamaForCausalLM:
        """For inference, when the weights are final (loading, `.to`; never while training): q/k/v
        and gate/up become one matrix each and every projection keeps a transposed copy (`project`),
        as gpt-fast fuses at load; the forward then reads these copies. Same numbers up to float
        rounding."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        self.lm_head_t, _ = transposed(self.lm_head)
        return self

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> float32 logits (..., V)."""
        weight_t = self.lm_head_t if self.lm_head_t is not None else self.lm_head.weight.t()
        return project(hidden, weight_t, None).float()

    # --- Hugging Face directory layout -------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None,
                        shared: dict[str, torch.Tensor] | None = None) -> LlamaForCausalLM:
        """dtype None: `load_dtype` (the checkpoint's bf16 / fp16 on CUDA, float32 on the CPU).
        The model is built in that dtype on the device, so a 3B bf16 checkpoint never exists in
        float32 (12 GB); rotary frequencies stay float32 as in transformers. shared: parameters
        the directory leaves out because another model holds them (a draft model's embeddings
        and output layer are its target's)."""
        path = Path(path)
        raw = json.loads((path / "config.json").read_text())
        cfg = LlamaConfig.from_dict(raw)
        device = torch.device(device)
        model = built(lambda: cls(cfg), device, dtype or load_dtype(raw, device))
        model.load_state_dict_hf({**(shared or {}), **read_safetensors(path)})
        return model.eval()

    def load_state_dict_hf(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a transformers checkpoint: each of `hf_parameter_names` (ours are the same)."""
        names = hf_parameter_names(self.config)
        own = dict(self.named_parameters())
        missing = [name for name in names if name not in tensors
                   and not (name == "lm_head.weight" and self.config.tie_word_embeddings)]
        if missing:
            raise ValueError(f"checkpoint lacks {missing[:4]}{'...' if len(missing) > 4 else ''}")
        with torch.no_grad():
            for name in names:
                if name in tensors:
                    param = own[name]
                    if param.shape != tensors[name].shape:
                        raise ValueError(f"{name}: shape {tuple(tensors[name].shape)}, "
                                         f"expected {tuple(param.shape)}")
                    param.copy_(tensors[name])

    def save_pretrained(self, path: str | Path, dtype: torch.dtype = torch.float32,
                        leave_out: tuple[str, ...] = ()) -> None:
        """Write config.json + model.safetensors (stored in `dtype`; loading converts back).
        leave_out: parameter names another model holds (`from_pretrained(shared=...)`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        raw = self.config.to_dict()
        raw["torch_dtype"] = str(dtype).removeprefix("torch.")
        (path / "config.json").write_text(json.dumps(raw, indent=2))
        own = dict(self.named_parameters())
        tensors = {name: own[name].detach().to(dtype).contiguous().cpu()
                   for name in hf_parameter_names(self.config) if name not in leave_out
                   and not (name == "lm_head.weight" and self.config.tie_word_embeddings)}
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def load_dtype(raw_config: dict, device: str | torch.device) -> torch.dtype:
    """The dtype a checkpoint runs in: on CUDA the one it is stored in when that is bf16 or fp16
    (its config's `torch_dtype`); float32 otherwise, and always on the CPU (the compiled CPU
    decoder and its kernels are float32)."""
    if torch.device(device).type == "cuda":
        return HALF_DTYPES.get(str(raw_config.get("torch_dtype")), torch.float32)
    return torch.float32


def built(make, device: str | torch.device, dtype: torch.dtype):
    """`make()` (a module constructor) with its parameters created in `dtype` directly on `device`
    (buffers computed in float32 where they ask for it, e.g. the rotary frequencies)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return make()
    finally:
        torch.set_default_dtype(previous)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face directory: `model.safetensors`, or the shards that
    `model.safetensors.index.json`'s weight_map names (any dtype: loading converts)."""
    if (path / "model.safetensors").exists():
        return load_file(str(path / "model.safetensors"))
    index = path / "model.safetensors.index.json"
    if not index.exists():
        raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    missing = [s for s in shards if not (path / s).exists()]
    if missing:
        raise ValueError(f"{path}: shards named by {index.name} are missing: {', '.join(missing)}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(str(path / shard)))
    return tensors


def hf_parameter_names(cfg: LlamaConfig) -> list[str]:
    """The parameter names of transformers' `LlamaForCausalLM` for `cfg`, which are this module's
    (tests/test_llama.py checks both against transformers)."""
    per_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    per_layer += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    per_layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    if cfg.attention_bias:
        per_layer += [f"self_attn.{p}_proj.bias" for p in "qkvo"]
    if cfg.mlp_bias:
        per_layer += [f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")]
    return (["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
            + [f"model.layers.{i}.{p}" for i in range(cfg.num_hidden_layers) for p in per_layer])


def init_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Random initialisation (normal std for linears and embeddings) with a fixed seed. Parameters
    on an accelerator are drawn there (a 3B model never passes through the host)."""
    gen = torch.Generator().manual_seed(seed)
    device_gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif p.device.type != "cpu":
                if p.device not in device_gens:
                    device_gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
                p.normal_(0.0, std, generator=device_gens[p.device])
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)

