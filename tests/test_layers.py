"""The one-way layers (bench > server > engine > models): import-linter's contracts in pyproject.toml
hold, and the engine and the models import without the web stack installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path, config: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [str(LINT_IMPORTS), "--no-cache"] + (["--config", str(config)] if config else [])
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_layers_contracts_hold():
    run = _lint(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_layers_contract_catches_an_upward_import(tmp_path):
    """The same contracts over a tree where a model imports the engine: lint-imports fails."""
    for pkg, body in {"bench": "", "server": "", "engine": "",
                      "models": "import engine.core\n"}.items():
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
        (tmp_path / pkg / "core.py").write_text(body)
    config = tmp_path / "contracts.toml"
    config.write_text(textwrap.dedent("""\
        [tool.importlinter]
        root_packages = ["bench", "server", "engine", "models"]
        [[tool.importlinter.contracts]]
        name = "bench > server > engine > models"
        type = "layers"
        layers = ["bench", "server", "engine", "models"]
        """))
    run = _lint(tmp_path, config)
    assert run.returncode != 0
    assert "models.core -> engine.core" in run.stdout


BLOCKED = ("fastapi", "starlette", "uvicorn", "pydantic_settings")

_IMPORT_ALL = """
import importlib, importlib.abc, pkgutil, sys

BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
        return None

sys.meta_path.insert(0, Block())
done = []
for pkg in ("engine", "models"):
    root = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(root.__path__, pkg + "."):
        importlib.import_module(info.name)
        done.append(info.name)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print(len(done))
"""


def test_engine_and_models_import_without_the_web_stack():
    """Every module of engine/ and models/ imports while fastapi, starlette, uvicorn and
    pydantic-settings cannot be imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", _IMPORT_ALL.format(blocked=BLOCKED)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) >= 20  # the walk found the packages' modules


def test_blocking_works():
    """The block above does stop the web stack (else the test above could not fail)."""
    code = _IMPORT_ALL.format(blocked=BLOCKED).replace('("engine", "models")', '("server",)')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode != 0 and "blocked by the test" in run.stderr
