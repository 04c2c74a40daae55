"""`spectts serve` (and `python -m server`): run the HTTP/WebSocket server.

Every flag is optional: an unset flag leaves the setting to its SPECTTS_* environment variable, then
to the default in `server.settings.Settings`. This module imports nothing heavy at import time, so
`spectts synth` does not pay for the server's dependencies.
"""

from __future__ import annotations

import argparse

_FLAGS: list[tuple[str, dict]] = [
    ("--host", {"help": "bind address (default 127.0.0.1; 0.0.0.0 in the container)"}),
    ("--port", {"type": int, "help": "TCP port (default 8000)"}),
    ("--bundle", {"help": "voice bundle directory (default: the shipped voice), or an "
                          "Orpheus-family checkpoint (with --codec)"}),
    ("--codec", {"help": "the checkpoint's codec directory (SNAC 24 kHz for Orpheus)"}),
    ("--draft", {"help": "a smaller Llama with the checkpoint's vocabulary (decoding 'draft')"}),
    ("--heads", {"help": "draft heads trained for the checkpoint by `spectts train-heads` "
                         "(decoding 'heads')"}),
    ("--device", {"choices": ("cpu", "cuda", "auto"), "help": "default auto"}),
    ("--threads", {"type": int, "help": "torch threads (default 1 on CPU)"}),
    ("--max-len", {"type": int, "help": "KV cache length per sequence (default 4096)"}),
    ("--decoding", {"help": "default decoding: auto | plain | heads | draft"}),
    ("--accept", {"help": "default acceptance: exact | tolerance | lossless"}),
    ("--tau", {"type": int, "help": "tolerance: top-tau (default 2)"}),
    ("--min-ratio", {"type": float, "help": "greedy tolerance: a top-tau token needs this share of "
                                            "the top token's probability (default 0.5)"}),
    ("--beta", {"type": float, "help": "draft + tolerance: SSD's beta (default 0.4)"}),
    ("--gamma", {"type": int, "help": "draft: tokens drafted per round (default 4)"}),
    ("--temperature", {"type": float, "help": "default sampling temperature (0: greedy; default: "
                                              "the voice's)"}),
    ("--max-input-chars", {"type": int, "help": "longest input text (default 4096)"}),
    ("--max-batch", {"type": int, "help": "requests decoded together (default 16; 1: one at a "
                                          "time)"}),
    ("--queue-size", {"type": int, "help": "requests waiting beyond the batch (default 64)"}),
    ("--max-queue-wait", {"type": float, "dest": "max_queue_wait_s",
                          "help": "refuse new requests (503) once the oldest waiting one has "
                                  "waited this long (default 2 s)"}),
    ("--no-admission-control", {"action": "store_const", "const": False,
                                "dest": "admission_control",
                                "help": "refuse only when the queue is full or old, never from "
                                        "the measured load"}),
    ("--prefill-chunk", {"type": int, "help": "prompt tokens prefilled per step (default 64)"}),
    ("--row-budget", {"type": int, "help": "speculative rows per step across the batch "
                                           "(default 64; 0: no cap)"}),
    ("--first-chunk-frames", {"type": int, "help": "speech frames (20 ms) in a sentence's first "
                                                   "audio chunk (default 4)"}),
    ("--chunk-frames", {"type": int, "help": "largest audio chunk in frames (default 40)"}),
    ("--capacity-margin", {"type": float, "help": "admit streams while each is generated this "
                                                  "much faster than real time (default 1.5)"}),
    ("--prefix-cache-blocks", {"type": int, "help": "16-token prompt blocks kept for reuse "
                                                    "(default 256; 0: off)"}),
    ("--request-timeout", {"type": float, "dest": "request_timeout_s",
                           "help": "seconds before a request is cancelled (default 300)"}),
    ("--api-key", {"help": "require 'Authorization: Bearer KEY' (prefer SPECTTS_API_KEY: flags "
                           "show in the process list)"}),
    ("--log-level", {"choices": ("critical", "error", "warning", "info", "debug")}),
]


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for flag, kwargs in _FLAGS:
        parser.add_argument(flag, default=None, **kwargs)


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
    preflight(settings.bundle, settings.codec, settings.draft, settings.heads)  # ValueError: one line, exit 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, timeout_graceful_shutdown=10)
    return 0
