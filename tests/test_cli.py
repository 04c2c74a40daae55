"""`spectts generate` prints one JSON object; bad input exits 2 with one line on stderr."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.decoding.engine import Engine
from engine.decoding.sampling import SamplingParams
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


@pytest.mark.parametrize("name", ["engine", "load", "voice", "profile-load", "vocoder-stream"])
def test_bench_subcommand_reaches_the_benchmark(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", name, "--help"])
    assert exc.value.code == 0
    assert "usage: spectts bench " + name in capsys.readouterr().out


def _help_defaults(argv: list[str], capsys, monkeypatch) -> dict[str, str]:
    """flag -> the default its --help states, e.g. {"--beta": "0.1"}."""
    import re

    monkeypatch.setenv("COLUMNS", "10000")  # one line per flag: argparse wraps at hyphens
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = capsys.readouterr().out
    out = {}
    for entry in re.split(r"\n(?=  -)", text):  # one entry per flag (help may start a line below)
        found = re.search(r"\(default: ([^)]+)\)$", " ".join(entry.split()))
        if entry.startswith("  --") and found:
            out[entry.split()[0]] = found.group(1)
    return out


def test_serve_help_states_the_settings_defaults(capsys, monkeypatch):
    """Every `spectts serve` flag is a setting, and its help states the setting's real default."""
    from server.settings import Settings

    stated = _help_defaults(["serve"], capsys, monkeypatch)
    for name, info in Settings.model_fields.items():
        flag = "--" + name.removesuffix("_s").replace("_", "-")
        if info.default is None or info.annotation is bool:
            continue
        assert stated.get(flag) == str(info.default), (flag, stated.get(flag), info.default)
    for flag in ("--beta", "--capacity-margin", "--max-queue-wait", "--request-timeout",
                 "--tau", "--min-ratio", "--gamma", "--max-batch"):
        assert flag in stated
    # unset, the temperature is the voice's (Orpheus samples): the help says so, states no number
    assert "--temperature" not in stated


@pytest.mark.parametrize("command", ["generate", "synth"])
def test_generation_flags_state_the_engine_defaults(command, capsys, monkeypatch):

    stated = _help_defaults([command], capsys, monkeypatch)
    sampling = ("temperature", "top_k", "top_p", "repetition_penalty", "repetition_window")
    engine_defaults = {**{f: getattr(GenerationConfig(), f) for f in
                          ("decoding", "accept", "tau", "beta", "min_ratio", "gamma")},
                       **{f: getattr(SamplingParams(), f) for f in sampling}}
    for name, value in engine_defaults.items():
        # synth samples as the voice does unless told (`generation_config`'s `sampling`)
        expected = "the voice's" if command == "synth" and name in sampling else str(value)
        assert stated["--" + name.replace("_", "-")] == expected
    max_new = stated["--max-new-tokens"]
    assert max_new == (str(GenerationConfig().max_new_tokens) if command == "generate"
                       else str(10**6))


def test_synth_flags_reach_the_engine_config():
    from server.cli import build_parser, generation_config

    args = build_parser().parse_args(["synth", "Hi.", "--beta", "0.3", "--top-k", "5"])
    cfg = generation_config(args)
    assert (cfg.beta, cfg.sampling.top_k, cfg.max_new_tokens) == (0.3, 5, 10**6)
    assert cfg.tau == GenerationConfig().tau
    assert cfg.sampling.temperature == SamplingParams().temperature  # unset: the engine's
    # a voice's sampling defaults fill the flags left unset; given flags win
    voice = SamplingParams(temperature=0.6, top_p=0.8, repetition_penalty=1.3)
    cfg = generation_config(args, voice)
    assert (cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.top_k) == (0.6, 0.8, 5)
