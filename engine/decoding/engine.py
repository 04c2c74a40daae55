"""The engine core: sequences in persistent cache slots, advanced together one step at a time.

One step structure for every decoding mode: propose (nothing / a tree from the draft heads / a chain
from the draft model) -> verify (ONE batched target forward over each sequence's pending tokens and
candidates, tree attention) -> accept (`speculative.verify`) -> commit (keep the accepted path in the
cache, roll back the rest, append accepted + bonus + forced tokens).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from engine.decoding.draft_proposer import chain, pad_blocks, propose_drafts
from engine.decoding.heads_proposer import build_tree, max_ranks
from engine.decoding.plan import SeqView, StepPlan, plan_step
from engine.decoding.prefix_cache import PrefixCache
from engine.decoding.sequence import Sequence
from engine.decoding.speculative import Candidates, verify
from engine.decoding.tree import default_accuracies, sparse_tree, validate_shape
from engine.types import ACCEPTS, Accept, ConfigError, Decoding, GenerationConfig, GenerationResult
from models import runners
from models.kv_cache import KVCache
from models.voices.bundle import Bundle, load_bundle
from models.voices.rules import NoRule, TokenRule


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Engine:
    def __init__(self, bundle: Bundle, max_batch: int = 8, max_len: int = 2048,
                 prefix_blocks: int = 0, prefix_block: int = 16, runner: str = "auto",
                 stop_tokens: tuple[int, ...] = ()) -> None:
        """prefix_blocks > 0: keep that many blocks of `prefix_block` prompt tokens for reuse.
        runner: how the networks' forwards execute (`models.runners`: "auto", "torch",
        "compiled-cpu"), chosen here once; `self.runner` says which.
        stop_tokens: end-of-sequence ids besides the config's and the bundle's (a voice family's
        end of speech)."""
        self.bundle = bundle
        self.target, self.draft, self.heads = bundle.target, bundle.draft, bundle.heads
        self.runner = runners.resolve(runner, self.target)
        self.target_runner = runners.model_runner(self.runner, self.target)
        self.draft_runner = (runners.model_runner(self.runner, self.draft)
                             if self.draft is not None else None)
        self.heads_runner = (runners.heads_runner(self.runner, self.heads)
                             if self.heads is not None else None)
        cfg = self.target.config
        self.vocab_size = cfg.vocab_size
        self.device = next(self.target.parameters()).device
        dtype = next(self.target.parameters()).dtype
        self.max_len = max_len
        self.cache = KVCache(cfg.num_hidden_layers, max_batch, cfg.num_key_value_heads, max_len,
                             cfg.head_dim, dtype, self.device)
        self.prefix_cache = (PrefixCache(self.cache, prefix_blocks, prefix_block)
                             if prefix_blocks > 0 else None)
        self.draft_cache = None
        if self.draft is not None:
            d = self.draft.config
            # the draft only proposes: its numbers need not be batch-invariant, the target's do
            self.draft_cache = KVCache(d.num_hidden_layers, max_batch, d.num_key_value_heads,
                                       max_len, d.head_dim, dtype, self.device,
                                       batch_invariant=False)
        eos = set(cfg.eos_token_id) | set(stop_tokens)
        if bundle.tokens is not None:
            eos.add(bundle.tokens.eos)
        self.eos = frozenset(eos)
        self.default_trees: dict[str, tuple[tuple[int, ...], ...]] = {}  # accept rule -> tree shape
        if self.heads is not None:
            spec = bundle.heads_spec
            for accept in ACCEPTS:
                self.default_trees[accept] = (tuple(validate_shape(spec.tree, spec.num_heads))
                                              if spec.tree else self.heads_tree(accept, spec.tree_nodes))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", max_batch: int = 8,
             max_len: int = 2048, prefix_blocks: int = 0, runner: str = "auto") -> Engine:
        return cls(load_bundle(path, resolve_device(device)), max_batch=max_batch, max_len=max_len,
                   prefix_blocks=prefix_blocks, runner=runner)

    def heads_tree(self, accept: str, nodes: int) -> tuple[tuple[int, ...], ...]:
        """The sparse tree of `nodes` candidates with the most expected accepted tokens, from the
        heads' measured accuracies under this accept rule (tolerance accepts more)."""
        spec = self.bundle.heads_spec
        exact = spec.accuracies or default_accuracies(spec.num_heads)
        return tuple(sparse_tree((spec.accuracies_tolerance or exact) if accept == Accept.TOLERANCE
                                 else exact, nodes))

    # --- public calls -------------------------------------------------------------------------
    def generate(self, prompt: list[int], cfg: GenerationConfig = GenerationConfig(),
                 rule: TokenRule | None = None) -> GenerationResult:
        return self.generate_batch([prompt], [cfg], [rule])[0]

    def generate_batch(self, prompts: list[list[int]], cfgs: list[GenerationConfig],
                       rules: list[TokenRule | None] | None = None, prefill_chunk: int = 0,
                       row_budget: int = 0) -> list[GenerationResult]:
        """Run sequences together to the end; results equal running each alone (prefill_chunk and
        row_budget: see `engine.decoding.plan`)."""
        rules = rules or [None] * len(prompts)
        for cfg in cfgs:
            self.check_config(cfg)
        seqs: list[Sequence] = []
        try:
            for prompt, cfg, rule in zip(prompts, cfgs, rules):
                seqs.append(self.add(prompt, cfg, rule))
            active = list(seqs)
            while active:
                self.step(active, self.plan(active, prefill_chunk, row_budget))
                for s in active:
                    if s.finished:  # its slots go back now: the others move down into them
                        self.release(s)
                active = [s for s in active if not s.finished]
        finally:
            for s in seqs:
                self.release(s)
        return [s.result() for s in seqs]

    # --- sequence lifecycle (the scheduler's surface) ----------------------------------------------
    def check_config(self, cfg: GenerationConfig) -> None:
        """ConfigError for a config this bundle cannot run: once per request, where it enters."""
        cfg.validate(self.heads.num_heads if self.heads is not None else None,
                     self.draft is not None)
        if cfg.tree is not None:
            try:
                validate_shape(list(cfg.tree), self.heads.num_heads)
            except ValueError as exc:
                raise ConfigError(str(exc), "tree") from None

    def check_prompt(self, prompt: list[int]) -> None:
        """ValueError for a prompt the engine cannot run (each sentence's, in `add`)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the cache holds {self.max_len}")

    def add(self, prompt: list[int], cfg: GenerationConfig, rule: TokenRule | None = None
            ) -> Sequence:
        """A new sequence in a free cache slot. `cfg` has passed `check_config` (the caller's, once
        per request); the prompt is checked here."""
        self.check_prompt(prompt)
        if cfg.decoding == Decoding.DRAFT and self.draft_cache.slots_in_use >= self.draft_cache.max_batch:
            raise RuntimeError("no free draft cache slot")
        seed = cfg.seed if cfg.seed is not None else random.randrange(2**63)
        slot = self.cache.allocate()
        draft_slot = self.draft_cache.allocate() if cfg.decoding == Decoding.DRAFT else None
        seq = Sequence(prompt=list(prompt), cfg=cfg, rule=rule or NoRule(), slot=slot,
                       draft_slot=draft_slot, generator=torch.Generator().manual_seed(seed),
                       eos=self.eos)
        seq.stats.prompt_tokens = len(prompt)
        if self.prefix_cache is not None:
            seq.stats.cached_prompt_tokens = self.prefix_cache.load(slot, seq.prompt)
        return seq

    def release(self, seq: Sequence) -> None:
        """Free the sequence's cache slots (finished, cancelled or failed). Idempotent."""
        if seq.slot >= 0:
            self.cache.release(seq.slot)
            seq.slot = -1
        if seq.draft_slot is not None:
            self.draft_cache.release(seq.draft_slot)
            seq.draft_slot = None
        if not seq.finished:
            seq.finish("aborted")

    def prefilling(self, seq: Sequence) -> bool:
        """Its prompt is not all in the cache yet (a newcomer, or one whose prompt is chunked)."""
        return self.cache.lengths[seq.slot] < len(seq.prompt)

    # --- one step: plan, then execute and commit -----------------------------------------------
    def plan(self, seqs: list[Sequence], prefill_chunk: int = 0, row_budget: int = 0) -> StepPlan:
        """The next step for these sequences, in priority order (`engine.decoding.plan`)."""
        views = []
        for s in seqs:
            cached = self.cache.lengths[s.slot]
            pending = len(s.tokens) - cached
            views.append(SeqView(pending=pending, room=self.max_len - cached - pending,
                                 prefilling=cached < len(s.prompt),
                                 speculates=s.cfg.decoding != Decoding.PLAIN))
        return plan_step(views, prefill_chunk, row_budget)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], plan: StepPlan | None = None) -> None:
        """Execute `plan` (default: `self.plan(seqs)`, no budgets) over `seqs`, the sequences it was
        made for: propose, one target forward per group, verify, commit."""
        plan = plan or self.plan(seqs)
        for i in plan.out_of_room:
            seqs[i].finish("cache")
        if not plan.scheduled:
            return
        self._pack(seqs)
        run = [seqs[x.index] for x in plan.scheduled]
        pending = [s.tokens[self.cache.lengths[s.slot]:] for s in run]
        blocks = [p[:x.write] for p, x in zip(pending, plan.scheduled)]
        cands = self._propose(run, pending, [x.max_candidates for x in plan.scheduled])
        chunked = [x.chunked for x in plan.scheduled]
        for group in plan.forward_groups([len(c) for c in cands]):
            self._verify([run[b] for b in group], [blocks[b] for b in group],
                         [cands[b] for b in group], [chunked[b] for b in group])

    def _pack(self, seqs: list[Sequence]) -> None:
        """Move sequences down into lower free cache slots (a released sequence leaves a gap), so
        that a step's slots form one range more often and attention reads a view of the cache, not
        a gathered copy of every sequence's keys and values. Moving copies one sequence's entries once."""
        for s, slot in zip(seqs, self.cache.pack([s.slot for s in seqs])):
            s.slot = slot
        drafting = [s for s in seqs if s.draft_slot is not None]
        if drafting:
            for s, slot in zip(drafting, self.draft_cache.pack([s.draft_slot for s in drafting])):
                s.draft_slot = slot

    def _verify(self, seqs: list[Sequence], blocks: list[list[int]], cands: list[Candidates],
                chunked: list[bool]) -> None:
        """One target forward over each sequence's block (pending tokens) + candidates, then accept
        and commit. A chunked block is a slice of a prompt: it is only written to the cache."""
        # in slot order: consecutive slots are read as a view of the cache instead of a gathered copy
        order = sorted(range(len(seqs)), key=lambda b: seqs[b].slot)
        seqs, blocks, cands, chunked = ([xs[b] for b in order] for xs in (seqs, blocks, cands, chunked))
        parents = [chain(len(p)) + [q + len(p) if q >= 0 else len(p) - 1 for q in c.parents]
                   for p, c in zip(blocks, cands)]
        layout = self.cache.layout([s.slot for s in seqs], parents)
        ids = pad_blocks([p + c.tokens for p, c in zip(blocks, cands)], self.device)
        hidden = self.target_runner.forward(ids, self.cache, layout)  # (B, T, D)
        # logits only where a token is decided: the root (last pending) and every candidate
        deciding = [b for b, ch in enumerate(chunked) if not ch]
        rows_b = [b for b in deciding for _ in range(len(cands[b]) + 1)]
        rows_t = [len(blocks[b]) - 1 + i for b in deciding for i in range(len(cands[b]) + 1)]
        logits = (self.target_runner.logits(hidden[rows_b, rows_t]).cpu() if rows_b
                  else None)  # (rows, V)

        first = 0
        for b, (s, p, c) in enumerate(zip(seqs, blocks, cands)):
            if chunked[b]:
                self.cache.commit(s.slot, list(range(len(p))))
                s.stats.target_forwards += 1
                continue
            rows = logits[first:first + len(c) + 1]
            first += len(c) + 1
            verdict = verify(c, rows, s.tokens, s.end_state, s.rule, s.cfg, s.cfg.decoding,
                             s.generator)
            # commit: the pending tokens and the accepted path stay in the cache
            self.cache.commit(s.slot, list(range(len(p))) + [len(p) + i for i in verdict.path])
            if self.prefix_cache is not None and not s.prefix_saved:
                self.prefix_cache.save(s.slot, s.prompt)
                s.prefix_saved = True
            last = len(p) - 1 + (verdict.path[-1] + 1 if verdict.path else 0)
            s.last_hidden = hidden[b, last].clone()
            self._count(s, c, verdict.path)
            s.extend([c.tokens[i] for i in verdict.path] + [verdict.bonus])
            if s.draft_slot is not None:  # roll the draft cache back to the accepted tokens
                self.draft_cache.truncate(s.draft_slot, min(self.draft_cache.lengths[s.draft_slot],
                                                            self.cache.lengths[s.slot]))

    def _propose(self, seqs: list[Sequence], pending: list[list[int]], room: list[int]
                 ) -> list[Candidates]:
        cands = [Candidates() for _ in seqs]
        by_heads = [b for b, s in enumerate(seqs)
                    if s.cfg.decoding == Decoding.HEADS and s.last_hidden is not None and room[b] > 0]
        if by_heads:
            shapes = [seqs[b].cfg.tree if seqs[b].cfg.tree is not None
                      else self.default_trees[seqs[b].cfg.accept] for b in by_heads]
            # the deepest head any tree reaches from its root (the last pending token)
            reach = max(len(pending[b]) - 1 + len(max_ranks(tuple(shape)))
                        for b, shape in zip(by_heads, shapes))
            head_logits = self.heads_runner(torch.stack([seqs[b].last_hidden for b in by_heads]),
                                     reach).cpu()
            for i, (b, shape) in enumerate(zip(by_heads, shapes)):
                s = seqs[b]
                cands[b] = build_tree(head_logits[i], shape, s.rule, s.end_state,
                                      len(pending[b]) - 1, max_nodes=room[b])
        by_draft = [b for b, s in enumerate(seqs) if s.cfg.decoding == Decoding.DRAFT]
        if by_draft:
            # a chain no longer than the tokens the sequence may still add (forced tokens join
            # it without a draft forward, and a rule may force long runs)
            drafts = propose_drafts(self.draft_runner, self.draft_cache, [seqs[b] for b in by_draft],
                                    [min(room[b], seqs[b].cfg.max_new_tokens - seqs[b].stats.tokens)
                                     for b in by_draft])
            for b, c in zip(by_draft, drafts):
                cands[b] = c
        return cands

    @staticmethod
    def _count(s: Sequence, c: Candidates, path: list[int]) -> None:
        st = s.stats
        st.target_forwards += 1
        accepted = set(path)
        for i in range(len(c)):
            if c.forced[i]:
                continue
            d = c.depth(i)
            while len(st.drafted_per_pos) < d:
                st.drafted_per_pos.append(0)
                st.accepted_per_pos.append(0)
            st.drafted += 1
            st.drafted_per_pos[d - 1] += 1
            if i in accepted:
                st.accepted += 1
                st.accepted_per_pos[d - 1] += 1
