"""`python -m server [flags]`: the same as `spectts serve [flags]`."""

from __future__ import annotations

import argparse
import sys

from server.serve import add_serve_flags, cmd_serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description="SpecTTS speech server")
    add_serve_flags(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except (ValueError, OSError) as exc:
        print(f"spectts serve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
