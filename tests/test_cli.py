"""`spectts generate` prints one JSON object; bad input exits 2 with one line on stderr."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.decoding.engine import Engine
from engine.types import GenerationConfig
from models.voices.bundle import save_bundle
from server.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle_dir(small_bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle")
    save_bundle(small_bundle, path)
    return path


def test_generate_json_matches_engine(bundle_dir):
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", "--bundle", str(bundle_dir),
         "--prompt-ids", "1,2,3", "--max-new-tokens", "12", "--decoding", "heads",
         "--accept", "exact", "--json", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    engine = Engine.load(bundle_dir, max_batch=1)
    expected = engine.generate([1, 2, 3], GenerationConfig(max_new_tokens=12))
    assert got["tokens"] == expected.tokens
    for key in ("tokens", "target_forwards", "drafted", "accepted", "mean_accepted_length",
                "gen_seconds"):
        assert key in got["stats"]
    assert got["stats"]["tokens"] == 12


@pytest.mark.parametrize("args", [
    ["--prompt-ids", "1,2,9999"],
    ["--prompt-ids", "1,2", "--max-new-tokens", "0"],
    ["--prompt-ids", "1,2", "--decoding", "heads", "--accept", "tolerance", "--tau", "0"],
    ["--prompt-ids", "1,2", "--decoding", "fast"],
    ["--prompt-ids", "1,x"],
])
def test_bad_input_exits_2_with_one_line(bundle_dir, args, capsys):
    try:
        code = main(["generate", "--bundle", str(bundle_dir), *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "error" in err


@pytest.mark.parametrize("name", ["engine", "load", "voice"])
def test_bench_subcommand_reaches_the_benchmark(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", name, "--help"])
    assert exc.value.code == 0
    assert "usage: spectts bench " + name in capsys.readouterr().out
