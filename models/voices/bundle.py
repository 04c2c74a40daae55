"""A bundle: everything a voice needs, described by one file, `spectts.json`.

    {"format": "spectts-bundle/1",
     "target": "target",                  # a Hugging Face Llama directory (config.json + model.safetensors)
     "draft": "draft",                    # optional: a smaller Llama directory, same vocabulary
     "draft_shares": ["lm_head.weight"],  # optional: parameters the draft takes from the target
     "heads": {"file": "heads.safetensors", "num_heads": 4, "shared_out": false,
               "accuracies": [[...], ...], "tree_nodes": 64, "tree": null},   # optional
                                          # shared_out: the heads use the target's lm_head
     "tokens": {"phonemes": [5, 133], "speech": [133, 645],
                "bos": 1, "sep": 2, "eop": 3, "eos": 4},                     # optional
     ...}                                 # other parts (vocoder, frontend) are read by their owners

A bare Hugging Face Llama directory is a bundle with only a target.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.heads import DraftHeads
from models.llama import LlamaConfig, LlamaForCausalLM, built, init_weights

BUNDLE_FILE = "spectts.json"
# the shipped voice (models/default_voice)
DEFAULT_VOICE = Path(__file__).resolve().parents[1] / "default_voice"
# who ends each phoneme: the speech LM ("model"), or espeak-ng's timing forced ("frontend")
PHONEME_DURATIONS = ("model", "frontend")
FORMAT = "spectts-bundle/1"


@dataclass(frozen=True)
class TokenLayout:
    """Token id ranges of an interleaved speech LM ([lo, hi) each) and its control tokens."""

    phonemes: tuple[int, int]
    speech: tuple[int, int]
    bos: int
    sep: int
    eop: int
    eos: int

    @classmethod
    def from_dict(cls, raw: dict) -> TokenLayout:
        return cls(phonemes=tuple(raw["phonemes"]), speech=tuple(raw["speech"]), bos=raw["bos"],
                   sep=raw["sep"], eop=raw["eop"], eos=raw["eos"])


@dataclass(frozen=True)
class HeadsSpec:
    num_heads: int
    accuracies: list[list[float]] | None = None  # [k][i]: P(head k+1's rank-i token is right)
    accuracies_tolerance: list[list[float]] | None = None  # [k][i]: P(... is in the target's top-τ)
    tree_nodes: int = 64
    tree: list[tuple[int, ...]] | None = None  # explicit tree shape, else chosen from accuracies
    shared_out: bool = False  # the heads' output layer is the target's lm_head (not stored)


@dataclass
class Bundle:
    path: Path
    target: LlamaForCausalLM
    draft: LlamaForCausalLM | None = None
    heads: DraftHeads | None = None
    heads_spec: HeadsSpec | None = None
    tokens: TokenLayout | None = None
    raw: dict = field(default_factory=dict)  # the whole spectts.json, for the other parts
    draft_shares: tuple[str, ...] = ()  # the draft's parameters that are the target's (not stored)


def load_bundle(path: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> Bundle:
    """dtype None: the target's `load_dtype` (its stored bf16 / fp16 on CUDA, else float32); the
    draft model and heads follow the target's dtype (they share its caches and hidden states)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"bundle {path} is not a directory")
    if not (path / BUNDLE_FILE).exists():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} has neither {BUNDLE_FILE} nor a Hugging Face config.json")
        return Bundle(path=path, target=LlamaForCausalLM.from_pretrained(path, device, dtype))
    raw = json.loads((path / BUNDLE_FILE).read_text())
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path / BUNDLE_FILE}: unknown format {raw.get('format')!r}")
    target = LlamaForCausalLM.from_pretrained(path / raw.get("target", "target"), device, dtype)
    dtype = target.lm_head.weight.dtype
    draft = None
    if raw.get("draft"):
        own = dict(target.named_parameters())
        shared = {name: own[name].detach() for name in raw.get("draft_shares", [])}
        draft = LlamaForCausalLM.from_pretrained(path / raw["draft"], device, dtype, shared)
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError("the draft model's vocabulary differs from the target's")
    heads = spec = None
    if raw.get("heads"):
        h = raw["heads"]
        spec = HeadsSpec(num_heads=h["num_heads"], accuracies=h.get("accuracies"),
                         accuracies_tolerance=h.get("accuracies_tolerance"),
                         tree_nodes=h.get("tree_nodes", 64),
                         tree=[tuple(p) for p in h["tree"]] if h.get("tree") else None,
                         shared_out=bool(h.get("shared_out", False)))
        heads = new_heads(target, spec, dtype)
        heads.load_state_dict(load_file(str(path / h.get("file", "heads.safetensors"))))
        heads = heads.eval()
    tokens = TokenLayout.from_dict(raw["tokens"]) if raw.get("tokens") else None
    return Bundle(path=path, target=target, draft=draft, heads=heads, heads_spec=spec,
                  tokens=tokens, raw=raw, draft_shares=tuple(raw.get("draft_shares", [])))


def new_heads(target: LlamaForCausalLM, spec: HeadsSpec, dtype: torch.dtype | None = None
              ) -> DraftHeads:
    """Untrained heads that fit the target (on its device, in `dtype` or the target's), using its
    output layer when `spec.shared_out`."""
    cfg, weight = target.config, target.lm_head.weight
    shared = target.lm_head if spec.shared_out else None
    return built(lambda: DraftHeads(spec.num_heads, cfg.hidden_size, cfg.vocab_size, shared),
                 weight.device, dtype or weight.dtype)


def bundle_name(path: str | Path) -> str:
    """The name a voice gives itself: "name" in its spectts.json, else its directory's name (an
    Orpheus checkpoint, a bare Llama directory). Reads no weights."""
    path = Path(path)
    try:
        raw = json.loads((path / BUNDLE_FILE).read_text())
    except (OSError, ValueError):
        return path.name
    name = raw.get("name") if isinstance(raw, dict) else None
    return name if isinstance(name, str) and name else path.name


def save_bundle(bundle: Bundle, path: str | Path, extra: dict | None = None) -> None:
    """Write target, draft and heads and a spectts.json that describes them (plus `extra` keys)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = {**bundle.raw, **(extra or {}), "format": FORMAT, "target": "target"}
    bundle.target.save_pretrained(path / "target")
    if bundle.draft is not None:
        bundle.draft.save_pretrained(path / "draft", leave_out=bundle.draft_shares)
        raw["draft"] = "draft"
        if bundle.draft_shares:
            raw["draft_shares"] = list(bundle.draft_shares)
    if bundle.heads is not None and bundle.heads_spec is not None:
        save_file({k: v.detach().float().contiguous().cpu()
                   for k, v in bundle.heads.state_dict().items()}, str(path / "heads.safetensors"))
        s = bundle.heads_spec
        raw["heads"] = {"file": "heads.safetensors", "num_heads": s.num_heads,
                        "shared_out": bundle.heads.shared_out,
                        "accuracies": s.accuracies,
                        "accuracies_tolerance": s.accuracies_tolerance, "tree_nodes": s.tree_nodes,
                        "tree": [list(p) for p in s.tree] if s.tree else None}
    if bundle.tokens is not None:
        t = bundle.tokens
        raw["tokens"] = {"phonemes": list(t.phonemes), "speech": list(t.speech), "bos": t.bos,
                         "sep": t.sep, "eop": t.eop, "eos": t.eos}
    (path / BUNDLE_FILE).write_text(json.dumps(raw, indent=2))


def random_bundle(vocab_size: int = 256, hidden_size: int = 64, num_layers: int = 2,
                  num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                  draft_layers: int = 1, num_draft_heads: int = 4, seed: int = 0,
                  std: float = 0.2, eos_token_id: int | None = None, shared_out: bool = False,
                  draft_shares: bool = False) -> Bundle:
    """A bundle with random weights (tests, and benchmarks before a trained voice exists). The draft
    model is initialised from the target's first layers, embeddings and output layer, as SSD does
    (`draft_shares`: and keeps the latter two as the target's); `shared_out`: the heads use the
    target's output layer."""
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                      num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      eos_token_id=() if eos_token_id is None else (eos_token_id,))
    target = LlamaForCausalLM(cfg)
    init_weights(target, std=std, seed=seed)
    target.eval()
    draft = None
    if draft_layers:
        draft = draft_from_target(target, draft_layers)
    heads = spec = None
    if num_draft_heads:
        heads = DraftHeads(num_draft_heads, hidden_size, vocab_size,
                           target.lm_head if shared_out else None)
        init_weights(heads, std=std, seed=seed + 1)
        heads.eval()
        spec = HeadsSpec(num_heads=num_draft_heads, shared_out=shared_out)
    return Bundle(path=Path("."), target=target, draft=draft, heads=heads, heads_spec=spec,
                  draft_shares=DRAFT_SHARES if draft and draft_shares else ())


# what a draft model trained with its target's embeddings and output layer frozen takes from the
# target instead of storing them (2 x V x D: 2.3M of a small voice's 3.2M-parameter draft)
DRAFT_SHARES = ("model.embed_tokens.weight", "lm_head.weight")


def draft_from_target(target: LlamaForCausalLM, num_layers: int) -> LlamaForCausalLM:
    """A draft decoder with the target's first `num_layers` layers (copied), embeddings, norm and head."""
    cfg_raw = target.config.to_dict()
    cfg_raw["num_hidden_layers"] = num_layers
    draft = LlamaForCausalLM(LlamaConfig.from_dict(cfg_raw))
    own = target.state_dict()
    draft.load_state_dict({k: v.clone() for k, v in own.items() if k in draft.state_dict()})
    return draft.eval()
