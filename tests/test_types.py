"""The engine's typed config and stats: one validation naming the field at fault, stats that merge
every field, and the documented facts about them."""

from dataclasses import fields

import pytest

from engine.decoding.engine import Engine
from engine.types import ConfigError, GenerationConfig, GenerationStats
from models.voices.rules import InterleavedRule


@pytest.mark.parametrize("kwargs,param", [
    ({"decoding": "fast"}, "decoding"), ({"accept": "maybe"}, "accept"), ({"tau": 0}, "tau"),
    ({"beta": -1.0}, "beta"), ({"min_ratio": 2.0}, "min_ratio"), ({"gamma": 0}, "gamma"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_a_bad_config_names_its_field(kwargs, param):
    with pytest.raises(ConfigError) as exc:
        GenerationConfig(**kwargs).validate(num_heads=4, has_draft=True)
    assert exc.value.param == param and isinstance(exc.value, ValueError)


def test_a_mode_the_bundle_lacks_is_a_config_error(small_bundle):
    from dataclasses import replace

    bundle = replace(small_bundle, heads=None, heads_spec=None)
    engine = Engine(bundle, max_batch=1, max_len=64)
    with pytest.raises(ConfigError) as exc:
        engine.check_config(GenerationConfig(decoding="heads"))
    assert exc.value.param == "decoding"


def test_merge_adds_every_field():
    """Every field of the stats is merged (a field added later is too): numbers add, per-depth
    lists add position by position."""
    def filled(k: int) -> GenerationStats:
        s = GenerationStats()
        for i, f in enumerate(fields(s)):
            value = getattr(s, f.name)
            setattr(s, f.name, [k * (i + j + 1) for j in range(k + 1)] if isinstance(value, list)
                    else type(value)(k * (i + 1)))
        return s

    total, part = filled(1), filled(2)
    total.merge(part)
    for i, f in enumerate(fields(total)):
        got = getattr(total, f.name)
        if isinstance(got, list):
            assert got == [(i + 1 + j) + 2 * (i + j + 1) if j < 2 else 2 * (i + j + 1)
                           for j in range(3)], f.name
        else:
            assert got == 3 * (i + 1), f.name


def test_plain_decoding_reports_more_than_one_token_per_forward_under_a_rule(small_bundle):
    """mean_accepted_length counts forced tokens: 1.0 for plain decoding without a rule, more
    with one that forces tokens (as a voice's phonemes are)."""
    import torch

    engine = Engine(small_bundle, max_batch=1, max_len=256)
    cfg = GenerationConfig(max_new_tokens=40, stop_on_eos=False)
    free = engine.generate([1, 2, 3], cfg)
    assert free.stats.mean_accepted_length == 1.0
    allowed = torch.zeros(engine.vocab_size, dtype=torch.bool)
    allowed[10:20] = True
    rule = InterleavedRule([5, 6, 7, 8], allowed | (torch.arange(engine.vocab_size) == 3), eop=3,
                           eos=4, max_frames=3)
    ruled = engine.generate([1, 2, 3], cfg, rule)
    assert ruled.stats.mean_accepted_length > 1.0


def test_the_bundle_docs_example_is_the_shipped_layout():
    """models.voices.bundle's docstring shows the token layout the shipped voice has."""
    import json
    import re

    from models.voices import bundle

    shipped = json.loads((bundle.DEFAULT_VOICE / bundle.BUNDLE_FILE).read_text())["tokens"]
    shown = re.search(r'"tokens": (\{[^}]*\})', bundle.__doc__).group(1)
    assert json.loads(" ".join(shown.split())) == shipped
