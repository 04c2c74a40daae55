"""The engine's per-sequence state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Hashable

import torch

from engine.types import GenerationConfig, GenerationResult, GenerationStats
from models.voices.rules import TokenRule


@dataclass
class Sequence:
    prompt: list[int]
    cfg: GenerationConfig
    rule: TokenRule
    slot: int  # in the target's cache
    draft_slot: int | None  # in the draft model's cache (draft decoding only)
    generator: torch.Generator
    eos: frozenset[int]
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    end_state: Hashable = None  # rule state after the last token of `tokens`
    last_hidden: torch.Tensor | None = None  # (D,) target hidden state that chose the first pending token
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str | None = None
    prefix_saved: bool = False  # its prompt's blocks are in the engine's prefix cache
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt)
        if self.end_state is None:
            self.end_state = self.rule.start()

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def extend(self, new: list[int]) -> None:
        """Append newly decided tokens, then any tokens the rule forces after them; finish at the
        end-of-sequence token or at max_new_tokens."""
        for token in new:
            if self._append(token):
                return
        while (forced := self.rule.constraint(self.end_state).forced) is not None:
            if self._append(forced):
                return

    def _append(self, token: int) -> bool:
        self.tokens.append(token)
        self.end_state = self.rule.advance(self.end_state, token)
        self.stats.tokens += 1
        if self.cfg.stop_on_eos and token in self.eos:
            self.finish("eos")
        elif self.stats.tokens >= self.cfg.max_new_tokens:
            self.finish("length")
        return self.finished

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.stats.truncated = int(reason in ("length", "cache"))
        self.stats.gen_seconds = time.perf_counter() - self.started

    def result(self) -> GenerationResult:
        return GenerationResult(tokens=self.generated, stats=self.stats,
                                finish_reason=self.finish_reason or "aborted")
