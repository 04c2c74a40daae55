"""Typed requests and results of the engine core.

Words used throughout (code, metrics, docs):
- drafted: candidate tokens proposed by the draft heads or draft model (forced tokens excluded);
- accepted: drafted tokens that verification kept;
- bonus: the token the target itself chooses after the last accepted one (one per target forward);
- recovered: a bonus token drawn from the residual distribution after a rejection (lossless / β rules);
- forced: tokens a `TokenRule` dictates; appended without sampling, never rejected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from engine.sampling import SamplingParams

DECODINGS = ("plain", "heads", "draft")
ACCEPTS = ("exact", "tolerance", "lossless")


PHONEME_DURATIONS = ("model", "frontend")  # who ends each phoneme: the speech LM, or espeak-ng
DEFAULT_BETA = 0.1  # SSD's β for draft + tolerance; chosen on a development set, not the held-out one


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    decoding: str = "plain"  # plain | heads | draft
    accept: str = "exact"  # exact | tolerance | lossless
    tau: int = 2  # tolerance: a candidate among the target's top-τ (or τ samples); greedy draft's support
    beta: float = DEFAULT_BETA  # draft + tolerance: accept if r < min(1, q/p) + β (SSD)
    # greedy tolerance: a top-τ token counts only if its probability is at least this share of the
    # target's top token's (temperature 1); 0: any of the top-τ (VADUSA), 1: only the top (exact).
    # 0.5 on the voice: heads τ=2 WER 14.58 % vs plain 14.49 % (0: 16.82 %), 3.82 tokens per forward
    min_ratio: float = 0.5
    gamma: int = 4  # draft: tokens drafted per round
    tree: tuple[tuple[int, ...], ...] | None = None  # heads: tree shape; None = the bundle's default
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_on_eos: bool = True

    def validate(self, num_heads: int | None, has_draft: bool) -> None:
        if self.decoding not in DECODINGS:
            raise ValueError(f"unknown decoding {self.decoding!r}; expected one of {DECODINGS}")
        if self.accept not in ACCEPTS:
            raise ValueError(f"unknown accept rule {self.accept!r}; expected one of {ACCEPTS}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.tau < 1:
            raise ValueError(f"tau must be >= 1, got {self.tau}")
        if not 0 <= self.min_ratio <= 1:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        if self.decoding == "heads" and not num_heads:
            raise ValueError("decoding 'heads' needs a bundle with draft heads")
        if self.decoding == "draft" and not has_draft:
            raise ValueError("decoding 'draft' needs a bundle with a draft model")
        self.sampling.validate()


@dataclass
class GenerationStats:
    tokens: int = 0  # new tokens (forced ones included)
    target_forwards: int = 0  # prefill included
    draft_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    gen_seconds: float = 0.0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens reused from the prefix cache, not computed
    truncated: int = 0  # sequences stopped by a length limit (max_new_tokens, the cache) before
    # their end token: a sentence whose speech never ended
    accepted_per_pos: list[int] = field(default_factory=list)  # accepted drafts by depth 1, 2, …
    drafted_per_pos: list[int] = field(default_factory=list)

    @property
    def mean_accepted_length(self) -> float:
        """New tokens per target forward, the bonus token included (plain decoding: 1.0)."""
        return self.tokens / self.target_forwards if self.target_forwards else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["mean_accepted_length"] = self.mean_accepted_length
        return out


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens only
    stats: GenerationStats
    finish_reason: str  # "eos" | "length" | "cache"
