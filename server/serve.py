"""`spectts serve` (and `python -m server`): run the HTTP/WebSocket server.

Every flag is a field of `server.settings.Settings`, with the field's description as its help and its
default in the help: one source, so a flag cannot drift from the setting. An unset flag leaves the
setting to its SPECTTS_* environment variable, then to the default. Field `name_s` (seconds) is flag
`--name`; a boolean that defaults to true is `--no-name`. The web stack (FastAPI, uvicorn) is imported
only when the server starts.
"""

from __future__ import annotations

import argparse
import types
import typing


def _flag(name: str) -> str:
    return "--" + name.removesuffix("_s").replace("_", "-")


def _argument(name: str, info) -> tuple[str, dict]:
    """The argparse flag and keyword arguments of one settings field."""
    from pydantic import SecretStr

    default = info.default
    shown = "" if default is None else f" (default: {default})"
    kwargs: dict = {"dest": name, "default": None, "help": (info.description or name) + shown}
    kind = info.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None -> X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is bool:
        if default is not True:
            raise TypeError(f"setting {name}: only booleans that default to true have a flag")
        return "--no-" + name.replace("_", "-"), {**kwargs, "action": "store_const", "const": False,
                                                  "help": f"turn off: {info.description}"}
    if typing.get_origin(kind) is typing.Literal:  # shown; checked by Settings, as the env is
        kwargs["metavar"] = "{" + ",".join(map(str, typing.get_args(kind))) + "}"
    elif kind is not SecretStr:
        kwargs["type"] = kind
    return _flag(name), kwargs


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    from server.settings import Settings

    for name, info in Settings.model_fields.items():
        flag, kwargs = _argument(name, info)
        parser.add_argument(flag, **kwargs)


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to the `spectts` subcommands."""
    parser = subparsers.add_parser("serve", help="serve the OpenAI-compatible speech API "
                                                 "(HTTP and WebSocket)")
    add_serve_flags(parser)
    return parser


def settings_from_args(args: argparse.Namespace):
    """Settings from the environment, with every given flag winning. ValueError when invalid."""
    from server.settings import Settings

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from engine.orpheus_tts import preflight
    from server.app import create_app

    settings = settings_from_args(args)
    for spec in settings.registry().models:  # ValueError: one line, exit 2
        preflight(spec.bundle, spec.codec, spec.draft, spec.heads)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.replicas > 1 or settings.max_replicas or settings.ray_address:
        from server.ray_launcher import serve_on_ray  # the `ray` extra; never imported otherwise

        return serve_on_ray(settings)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, timeout_graceful_shutdown=10)
    return 0
