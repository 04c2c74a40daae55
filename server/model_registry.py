"""Which models a server serves, by name, and which one a request's `model` picks.

One place for names, used by the server (`server.settings.Settings.registry`) and by the command
line (`spectts synth --model`, `spectts bench engine|voice --model`), so both accept the same names:

- `--models tts-1=DIR,tts-1-hd=DIR2` (SPECTTS_MODELS): each NAME=DIR pair is a model (DIR: a voice
  bundle, or a Hugging Face checkpoint directory as `--bundle` takes); the first is the default.
- unset: one model, `tts-1`, from `--bundle` (with `--codec`, `--draft`, `--heads`), also known by
  the bundle's own name.
- `spectts` is always an alias of the default model; no `model` in a request means the default.
OpenAI's names are real model names: `tts-1-hd` is refused unless a model of that name is served.
HTTP-free: only names and paths (no weights are read).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from models.voices.bundle import bundle_name

DEFAULT_NAME = "tts-1"  # the single --bundle model's name
DEFAULT_ALIAS = "spectts"  # always the default model
OPENAI_MODELS = ("tts-1", "tts-1-hd")  # never aliases: only a served model answers to them
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
MODELS_HELP = ("models served side by side, NAME=DIR pairs separated by commas (e.g. "
               "tts-1=models/default_voice,tts-1-hd=DIR), each DIR a voice bundle or a Hugging "
               "Face checkpoint; the first is the default model; unset: one model, tts-1, from "
               "bundle (codec, draft and heads apply to that one only)")


class UnknownModel(ValueError):
    """A model name that is neither served nor an alias; the message lists the served names."""


@dataclass(frozen=True)
class ModelSpec:
    """One served model: its name and where it loads from (codec/draft/heads: the single --bundle
    model's checkpoint options)."""

    name: str
    bundle: Path
    codec: Path | None = None
    draft: Path | None = None
    heads: Path | None = None


@dataclass(frozen=True)
class ModelRegistry:
    """The served models (the first is the default) and the aliases that name them."""

    models: tuple[ModelSpec, ...]
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> a model's name

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        if not names:
            raise ValueError("no model to serve")
        for name in names:
            if not _NAME.fullmatch(name):
                raise ValueError(f"model name {name!r}: use letters, digits and . _ : - "
                                 "(at most 64 characters)")
            if name == DEFAULT_ALIAS:
                raise ValueError(f"{DEFAULT_ALIAS!r} is the default model's alias, not a name")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"model names must differ: {', '.join(repeated)} given twice")

    @classmethod
    def parse(cls, pairs: str) -> ModelRegistry:
        """`NAME=DIR,NAME=DIR` (whitespace around items ignored); ValueError saying what is wrong."""
        specs = []
        for item in pairs.split(","):
            name, sep, path = (part.strip() for part in item.partition("="))
            if not sep or not name or not path:
                raise ValueError(f"models: expected NAME=DIR pairs separated by commas, got "
                                 f"{item.strip()!r}")
            specs.append(ModelSpec(name, Path(path).expanduser()))
        return cls(tuple(specs), {DEFAULT_ALIAS: specs[0].name})

    @classmethod
    def single(cls, bundle: str | Path, codec: str | Path | None = None,
               draft: str | Path | None = None, heads: str | Path | None = None) -> ModelRegistry:
        """One model, `tts-1`, from `bundle`; its own name (`bundle_name`) is an alias too, unless
        that is an OpenAI model name."""
        def path(p):
            return None if p is None else Path(p)

        spec = ModelSpec(DEFAULT_NAME, Path(bundle), path(codec), path(draft), path(heads))
        aliases = {DEFAULT_ALIAS: DEFAULT_NAME}
        own = bundle_name(bundle)
        if own not in OPENAI_MODELS and own != DEFAULT_ALIAS:
            aliases[own] = DEFAULT_NAME
        return cls((spec,), aliases)

    @classmethod
    def build(cls, models: str | None, bundle: str | Path, codec: str | Path | None = None,
              draft: str | Path | None = None, heads: str | Path | None = None) -> ModelRegistry:
        """`models` pairs when given (then `bundle` is not used), else the single `bundle` model."""
        if not models:
            return cls.single(bundle, codec, draft, heads)
        given = [flag for flag, value in (("codec", codec), ("draft", draft), ("heads", heads))
                 if value is not None]
        if given:
            raise ValueError(f"codec, draft and heads are for the single bundle model, not for "
                             f"models (given: {', '.join(given)}); serve such a checkpoint alone")
        return cls.parse(models)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def default(self) -> ModelSpec:
        return self.models[0]

    def resolve(self, name: str | None) -> ModelSpec:
        """The model a request's `model` names (None: the default); UnknownModel listing the
        served names."""
        if name is None:
            return self.default
        target = self.aliases.get(name, name)
        for spec in self.models:
            if spec.name == target:
                return spec
        raise UnknownModel(f"unknown model {name!r}; the models served are "
                           f"{', '.join(self.names)} ({DEFAULT_ALIAS!r} is {self.default.name!r})")


# --- the command line: the same names as the server --------------------------------------------

def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--model NAME and --models PAIRS, as `spectts serve` names its models."""
    parser.add_argument("--model", default=None, help=f"the model to use, by the names the server "
                        f"takes (default: the default model; {DEFAULT_ALIAS} is the default too)")
    parser.add_argument("--models", default=None, help=MODELS_HELP.replace("bundle (", "--bundle ("))


def chosen_model(args: argparse.Namespace, bundle: str | Path, codec=None, draft=None,
                 heads=None) -> ModelSpec:
    """The ModelSpec that `--model` picks among `--models` (or the single `bundle`); ValueError
    (UnknownModel listing the known names) otherwise."""
    return ModelRegistry.build(args.models, bundle, codec, draft, heads).resolve(args.model)
