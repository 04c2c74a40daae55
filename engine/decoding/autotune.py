"""Decoding "auto": the fastest decoding for this machine, measured on the voice before serving.

Why measure: whether speculation pays depends on the hardware more than on the voice. A target
forward of k rows costs about one row's time where a forward is bound by reading the weights (a
GPU; an older CPU whose cache does not hold the model), and about k times as much where the weights
stay in cache and the multiply-adds are the cost. On the shipped voice, one thread: an AVX2 EPYC
ran heads with a 4-node tree at 1.43x plain and a 16-node tree at 0.95x; an AVX-512 EPYC ran a
2-node tree at 0.96-1.14x and the 16-node tree at 0.45-0.56x (`spectts bench engine --tree-nodes`).

So "auto" decodes one sentence with every candidate — plain, heads with the bundle's tree and smaller
ones, draft — round-robin, a few rounds, and keeps the highest median tokens/s (speculation only if
it beats plain by `SPECULATION_MARGIN`). With `exact` acceptance every candidate gives plain's
tokens, so the choice changes speed, never the audio.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from engine.types import Decoding, GenerationConfig

if TYPE_CHECKING:
    from engine.tts import TextToSpeech

TREE_SIZES = (2, 4, 8)  # heads trees tried besides the bundle's own (smaller ones only)
# speculation must be this much faster than plain alone to be chosen: under concurrent load its
# candidate rows make every batched forward dearer (shipped voice, AVX-512 EPYC, LM alone: heads with
# a 2-node tree 1.11x plain for one sentence, 0.87x for 16 at once), and a choice inside the noise of
# a shared machine would flip from one start to the next (2-node tree 1.06-1.16x plain in 3 starts)
SPECULATION_MARGIN = 1.2


@dataclass(frozen=True)
class Measured:
    label: str  # "plain", "heads 4 nodes", "draft"
    cfg: GenerationConfig
    tokens_per_s: float  # median over the rounds


def candidates(tts: TextToSpeech, cfg: GenerationConfig) -> list[tuple[str, GenerationConfig]]:
    """Every decoding the bundle supports, with `cfg`'s other settings; heads once per tree size."""
    engine = tts.engine
    out = [("plain", replace(cfg, decoding=Decoding.PLAIN, tree=None))]
    if engine.heads is not None:
        default = len(engine.default_trees[cfg.accept])
        for n in sorted({default, *(n for n in TREE_SIZES if n < default)}):
            tree = engine.heads_tree(cfg.accept, n)
            out.append((f"heads {n} nodes", replace(cfg, decoding=Decoding.HEADS, tree=tree)))
    if engine.draft is not None:
        out.append(("draft", replace(cfg, decoding=Decoding.DRAFT, tree=None)))
    return out


def measure(tts: TextToSpeech, text: str, cfg: GenerationConfig, rounds: int = 3,
            max_tokens: int = 160) -> list[Measured]:
    """Tokens/s of each candidate generating the first `max_tokens` of `text`'s first sentence alone
    (batch 1, engine only: no vocoder), round-robin so that a slow moment of a shared machine hits
    every candidate."""
    plan = tts.plan(text)[0]
    cands = candidates(tts, cfg)
    rates: list[list[float]] = [[] for _ in cands]
    for _ in range(rounds + 1):  # the first round warms up (compiled kernels, caches)
        for i, (_, c) in enumerate(cands):
            c = replace(tts.generation_config(plan, c), max_new_tokens=max_tokens)
            r = tts.engine.generate(plan.prompt, c, tts.rule(plan))
            rates[i].append(r.stats.tokens / max(r.stats.gen_seconds, 1e-9))
    return [Measured(label, c, statistics.median(rs[1:])) for (label, c), rs in zip(cands, rates)]


def fastest(measured: list[Measured], margin: float = 1.0) -> Measured:
    """The highest tokens/s; a speculative mode must beat plain by `margin` to be chosen."""
    def score(m: Measured) -> float:
        return m.tokens_per_s / (margin if m.cfg.decoding != Decoding.PLAIN else 1.0)
    return max(measured, key=score)


def auto_config(tts: TextToSpeech, text: str, cfg: GenerationConfig, rounds: int = 3
                ) -> tuple[GenerationConfig, list[Measured]]:
    """`cfg` with the fastest decoding measured here; its tree is the fastest heads tree, so a request
    that asks for heads gets that tree too. Also returns the measurements."""
    measured = measure(tts, text, cfg, rounds)
    best = fastest(measured, SPECULATION_MARGIN)
    heads = [m for m in measured if m.cfg.decoding == Decoding.HEADS]
    tree = fastest(heads).cfg.tree if heads else None
    return replace(best.cfg, tree=tree), measured
