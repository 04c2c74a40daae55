"""Draft heads kept beside a checkpoint they were trained for (`spectts train-heads --out DIR`,
served with `--heads DIR`):

    DIR/heads.safetensors   the DraftHeads' parameters (stored in the target's dtype)
    DIR/heads.json          {"format": "spectts-heads/1", "num_heads": 4, "hidden_size": 3072,
                             "vocab_size": 156940, "tree_nodes": 64, "shared_out": true,
                             "accuracies": [[...], ...], "accuracies_tolerance": [[...], ...],
                             "metrics": {...}}   # how they were trained and measured

accuracies[k][i]: how often head k+1's rank-i token was the target's own next-but-k token on
held-out generations; they choose the candidate tree as the shipped voice's do (`engine.tree`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.heads import DraftHeads
from models.llama import LlamaForCausalLM
from models.voices.bundle import HeadsSpec, new_heads

HEADS_FILE = "heads.safetensors"
SPEC_FILE = "heads.json"
FORMAT = "spectts-heads/1"


def save_heads(heads: DraftHeads, out: str | Path, spec: HeadsSpec, metrics: dict,
               dtype: torch.dtype = torch.float32) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = heads.heads[0].out.weight
    save_file({k: v.detach().to(dtype).contiguous().cpu() for k, v in heads.state_dict().items()},
              str(out / HEADS_FILE))
    (out / SPEC_FILE).write_text(json.dumps({
        "format": FORMAT, "num_heads": heads.num_heads, "hidden_size": first.shape[1],
        "vocab_size": first.shape[0], "tree_nodes": spec.tree_nodes,
        "shared_out": heads.shared_out,
        "accuracies": spec.accuracies, "accuracies_tolerance": spec.accuracies_tolerance,
        "metrics": metrics}, indent=1))
    return out


def check_dir(path: str | Path) -> None:
    """ValueError naming the file a heads directory lacks."""
    for name in (SPEC_FILE, HEADS_FILE):
        if not (Path(path) / name).exists():
            raise ValueError(f"the heads directory {path} lacks {name} (spectts train-heads --out)")


def load_heads(path: str | Path, target: LlamaForCausalLM) -> tuple[DraftHeads, HeadsSpec]:
    """The heads of DIR on the target's device and in its dtype. ValueError naming what is missing
    or what does not fit the target (hidden size, vocabulary)."""
    path = Path(path)
    check_dir(path)
    raw = json.loads((path / SPEC_FILE).read_text())
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path / SPEC_FILE}: unknown format {raw.get('format')!r}")
    cfg = target.config
    if (raw["hidden_size"], raw["vocab_size"]) != (cfg.hidden_size, cfg.vocab_size):
        raise ValueError(f"the heads in {path} were trained for hidden size {raw['hidden_size']} "
                         f"and vocabulary {raw['vocab_size']}; this checkpoint has "
                         f"{cfg.hidden_size} and {cfg.vocab_size}")
    spec = HeadsSpec(num_heads=raw["num_heads"], accuracies=raw.get("accuracies"),
                     accuracies_tolerance=raw.get("accuracies_tolerance"),
                     tree_nodes=raw.get("tree_nodes", 64),
                     shared_out=bool(raw.get("shared_out", False)))
    heads = new_heads(target, spec)
    heads.load_state_dict(load_file(str(path / HEADS_FILE), device=str(target.lm_head.weight.device)))
    return heads.eval(), spec
