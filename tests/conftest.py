from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import tiny

CACHE = Path(os.environ.get("MOEKIT_TEST_CACHE", Path.home() / ".cache" / "moekit-tests"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """model_type -> folder of a tiny random model; built on first use, once per session."""
    return built_once(tmp_path_factory.mktemp("tiny"), tiny.build)


def built_once(root: Path, build):
    """model_type -> the folder `build(model_type, root / model_type)` made, built on first use."""
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = build(model_type, root / model_type)
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M weights as a float32 safetensors folder, converted once and cached
    outside the repo (set MOEKIT_TEST_CACHE to move the cache)."""
    target = CACHE / "smollm2-135m-f32"
    if not (target / "config.json").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        run_moekit("convert", "smollm2-135m", str(target), "--overwrite", check=True)
    return target


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def run_moekit(*args: str, check: bool = False) -> Run:
    """Run the real CLI in this process (a subprocess costs seconds of imports per call)."""
    from typer.testing import CliRunner

    from moekit.cli import app

    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    proc = Run(result.exit_code, result.stdout, result.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"moekit {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def run_moekit_process(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI as a separate process, where process behaviour itself is under test."""
    return subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True, text=True)
