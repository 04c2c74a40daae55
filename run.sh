#!/usr/bin/env bash
# SpecTTS on a fresh machine:
#   bash run.sh test    set up .venv and run the tests
#   bash run.sh serve   set up .venv and serve the default voice on port 8000
set -euo pipefail
cd "$(dirname "$0")"

setup() {
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    local stamp=.venv/.setup-stamp want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        .venv/bin/pip install --quiet --upgrade pip
        .venv/bin/pip install --quiet -e ".[test]"
        echo "$want" > "$stamp"
    fi
}

case "${1:-}" in
    test)
        setup
        shift
        exec .venv/bin/python -m pytest "$@"
        ;;
    serve)
        setup
        echo "run.sh serve: the HTTP server is not built yet (issue 6); use 'spectts generate'" >&2
        exit 1
        ;;
    *)
        echo "usage: bash run.sh test|serve" >&2
        exit 2
        ;;
esac
