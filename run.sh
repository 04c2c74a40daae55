#!/usr/bin/env bash
# SpecTTS on a fresh machine:
#   bash run.sh test    set up .venv and run the tests
#   bash run.sh serve   set up .venv and serve the default voice on port 8000
set -euo pipefail
cd "$(dirname "$0")"

system_packages() {
    # Festival + the SLT HTS voice: the teacher of the natural voice and its text frontend;
    # espeak-ng: the first voice's teacher and frontend (libespeak-ng1); the rest: corpus sources;
    # for the tests ($1 = test) also chromium and its driver (the playground's browser test)
    local need=()
    command -v festival >/dev/null && [ -d /usr/share/festival/voices/us/cmu_us_slt_arctic_hts ] \
        || need+=(festival festvox-us-slt-hts)
    [ -e /usr/lib/x86_64-linux-gnu/libespeak-ng.so.1 ] || ldconfig -p | grep -q libespeak-ng.so.1 || need+=(espeak-ng)
    [ -d /usr/share/games/fortunes ] || need+=(fortune-mod fortunes fortunes-min)
    [ -e /usr/share/dict/american-english ] || need+=(wamerican)
    [ -e /usr/share/state/us-constitution.gz ] || need+=(miscfiles)
    if [ "${1:-}" = test ]; then
        command -v chromium >/dev/null || need+=(chromium)
        command -v chromedriver >/dev/null || need+=(chromium-driver)
    fi
    if ((${#need[@]})); then
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
        else
            echo "run.sh: please install the Debian packages: ${need[*]}" >&2
        fi
    fi
}

setup() {
    system_packages "${1:-}"
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
        setup test
        shift
        exec .venv/bin/python -m pytest "$@"
        ;;
    serve)
        setup
        shift
        exec .venv/bin/spectts serve --host 0.0.0.0 --port 8000 "$@"
        ;;
    *)
        echo "usage: bash run.sh test|serve" >&2
        exit 2
        ;;
esac
