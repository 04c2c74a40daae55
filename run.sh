#!/usr/bin/env bash
# SpecTTS on a fresh machine:
#   bash run.sh test    set up .venv and run the tests
#   bash run.sh serve   set up .venv and serve the default voice on port 8000
#                       (--replicas N: N engines on Ray Serve, the `ray` extra installed)
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
    # $1: the extras to install (tests: test and ray, for the Ray Serve tests); $2 = test: also the
    # Debian packages only the tests need
    local extras=$1
    system_packages "${2:-}"
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
    local stamp=.venv/.setup-stamp want
    want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        .venv/bin/pip install --quiet --upgrade pip
        .venv/bin/pip install --quiet -e ".[$extras]"
        echo "$want" > "$stamp"
    fi
}

case "${1:-}" in
    test)
        setup test,ray test
        shift
        export RAY_USAGE_STATS_ENABLED=0
        exec .venv/bin/python -m pytest "$@"
        ;;
    serve)
        shift
        extras=test  # and Ray Serve when asked for replicas (README "Scale-out")
        case " $* ${SPECTTS_REPLICAS:+--replicas} ${SPECTTS_RAY_ADDRESS:+--ray-address} " in
            *" --replicas"*|*" --max-replicas"*|*" --ray-address"*) extras=test,ray ;;
        esac
        setup "$extras"
        exec .venv/bin/spectts serve --host 0.0.0.0 --port 8000 "$@"
        ;;
    *)
        echo "usage: bash run.sh test|serve" >&2
        exit 2
        ;;
esac
