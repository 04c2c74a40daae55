"""Logits processing and sampling, shared by plain decoding, drafting and verification.

Every rule that decides a token goes through `process` so that draft, verify and plain decoding see the
same numbers: repetition penalty over a recent window, then the step's allowed-token mask, then (for
sampling) temperature, top-k and top-p, in that order (as transformers' logits processors do).
All functions work on one position's logits, a float32 (V,) tensor on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    # metadata["help"]: the one help text of the CLI flag, the server setting and the API field
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0: greedy)"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely (0: off)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1: off)"})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "> 1 discourages the tokens of the recent window (1: off)"})
    repetition_window: int = field(default=64, metadata={
        "help": "how many of the latest tokens the repetition penalty looks at"})

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.repetition_window < 0:
            raise ValueError(f"repetition_window must be >= 0, got {self.repetition_window}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process(logits: torch.Tensor, params: SamplingParams, context: list[int],
            allowed: torch.Tensor | None) -> torch.Tensor:
    """Raw logits (V,) -> penalised and masked logits (V,). `context` is every token before this
    position (prompt included); `allowed` a (V,) bool mask or None."""
    if params.repetition_penalty != 1.0 and params.repetition_window and context:
        recent = torch.tensor(context[-params.repetition_window:], dtype=torch.long)
        score = logits.gather(0, recent)
        score = torch.where(score < 0, score * params.repetition_penalty,
                            score / params.repetition_penalty)
        logits = logits.scatter(0, recent, score)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits


def distribution(logits: torch.Tensor, params: SamplingParams, temperature: float | None = None
                 ) -> torch.Tensor:
    """Processed logits (V,) -> the filtered sampling distribution (V,) at `temperature`
    (default: the params'). Temperature 0 gives the one-hot greedy choice."""
    t = params.temperature if temperature is None else temperature
    if t == 0:
        return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).float()
    logits = logits / t
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs > params.top_p  # mass before this token already > p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits.softmax(-1)


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from processed logits: argmax when greedy, else a sample."""
    if params.greedy:
        return int(logits.argmax())
    return draw(distribution(logits, params), generator)


def residual(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """norm(max(0, q - p)): where speculative sampling resamples after a rejection; q itself when
    the residual has no mass (q == p)."""
    r = (q - p).clamp_min(0)
    total = r.sum()
    return r / total if total > 0 else q
