"""ruff is part of the test command: the library stays lint-clean on every CI run."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.fail("ruff is not installed; it comes with the [test] extra: pip install -e '.[test]'")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_quickstart_demo_runs(tmp_path):
    """The README's quickstart, as written: compile -> misses -> ak-tune -> hits, correct gradients."""
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "AUTOKERNEL_CACHE_DIR": str(tmp_path),
           "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "autokernel.demo"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "miss=3" in result.stdout and "hit=3" in result.stdout  # 2 RMSNorms and the SwiGLU
