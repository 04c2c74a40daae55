"""Typed requests and results of the engine core.

Words used throughout (code, metrics, docs):
- drafted: candidate tokens proposed by the draft heads or draft model (forced tokens excluded);
- accepted: drafted tokens that verification kept;
- bonus: the token the target itself chooses after the last accepted one (one per target forward);
- recovered: a bonus token drawn from the residual distribution after a rejection (lossless / β rules);
- forced: tokens a `TokenRule` dictates; appended without sampling, never rejected.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import StrEnum

from engine.decoding.sampling import SamplingParams


class Decoding(StrEnum):
    """What proposes candidates: nothing, the draft heads (a tree) or the draft model (a chain)."""

    PLAIN = "plain"
    HEADS = "heads"
    DRAFT = "draft"


class Accept(StrEnum):
    """How verification accepts a candidate (see `engine.decoding.speculative.verify`)."""

    EXACT = "exact"
    TOLERANCE = "tolerance"
    LOSSLESS = "lossless"


class ConfigError(ValueError):
    """A generation setting the engine cannot run; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


DECODINGS = tuple(d.value for d in Decoding)
ACCEPTS = tuple(a.value for a in Accept)


def _help(text: str) -> dict:
    """A field's help text: the one source for the CLI's --help, the server settings' description and
    the API schema (`help_of`)."""
    return {"help": text}


def default_of(cls: type, name: str):
    """The default of dataclass `cls`'s field `name`."""
    f = {f.name: f for f in fields(cls)}[name]
    return f.default_factory() if f.default is MISSING else f.default


def help_of(cls: type, name: str) -> str:
    return {f.name: f for f in fields(cls)}[name].metadata.get("help", "")


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = field(default=256, metadata=_help("new tokens at most"))
    decoding: str = field(default=Decoding.PLAIN, metadata=_help(" | ".join(DECODINGS)))
    accept: str = field(default=Accept.EXACT, metadata=_help(" | ".join(ACCEPTS)))
    tau: int = field(default=2, metadata=_help(
        "tolerance: a candidate among the target's top-tau (heads: or tau samples); greedy "
        "draft's support"))
    beta: float = field(default=0.1, metadata=_help(
        "draft + tolerance: SSD's beta, accept if r < min(1, q/p) + beta"))
    min_ratio: float = field(default=0.5, metadata=_help(
        "greedy tolerance: a top-tau token needs this share of the top token's probability "
        "(0: any of the top-tau, 1: only the top)"))
    gamma: int = field(default=4, metadata=_help("draft: tokens drafted per round"))
    tree: tuple[tuple[int, ...], ...] | None = None  # heads: tree shape; None = the bundle's default
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = field(default=None, metadata=_help("sampling seed (default: random)"))
    stop_on_eos: bool = True

    def validate(self, num_heads: int | None, has_draft: bool) -> None:
        """ConfigError (a ValueError naming the field) for a config this bundle cannot run."""
        def need(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise ConfigError(message, param)
        need(self.decoding in DECODINGS, "decoding",
             f"unknown decoding {self.decoding!r}; expected one of {DECODINGS}")
        need(self.accept in ACCEPTS, "accept",
             f"unknown accept rule {self.accept!r}; expected one of {ACCEPTS}")
        need(self.max_new_tokens > 0, "max_new_tokens",
             f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        need(self.tau >= 1, "tau", f"tau must be >= 1, got {self.tau}")
        need(0 <= self.min_ratio <= 1, "min_ratio", f"min_ratio must be in [0, 1], got {self.min_ratio}")
        need(self.beta >= 0, "beta", f"beta must be >= 0, got {self.beta}")
        need(self.gamma >= 1, "gamma", f"gamma must be >= 1, got {self.gamma}")
        need(self.decoding != Decoding.HEADS or bool(num_heads), "decoding",
             "decoding 'heads' needs a bundle with draft heads")
        need(self.decoding != Decoding.DRAFT or has_draft, "decoding",
             "decoding 'draft' needs a bundle with a draft model")
        try:
            self.sampling.validate()
        except ValueError as exc:
            raise ConfigError(str(exc), str(exc).split()[0]) from None


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
        """New tokens per target forward: accepted + bonus + forced tokens. Plain decoding without
        a rule gives 1.0; under a rule that forces tokens (a voice's phonemes) more."""
        return self.tokens / self.target_forwards if self.target_forwards else 0.0

    def merge(self, other: GenerationStats) -> None:
        """Add `other`'s counts to these: every number summed, every per-depth list summed by
        position (a field added later is merged too)."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, list):
                mine += [0] * (len(theirs) - len(mine))
                for i, v in enumerate(theirs):
                    mine[i] += v
            else:
                setattr(self, f.name, mine + theirs)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["mean_accepted_length"] = self.mean_accepted_length
        return out


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens only
    stats: GenerationStats
    finish_reason: str  # "eos" | "length" | "cache"
