"""`python -m server.healthcheck`: exit 0 when this machine's server answers GET /health (the
container's HEALTHCHECK; the image has no curl). Reads SPECTTS_PORT like the server."""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('SPECTTS_PORT', '8000')}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
