"""Under CI a missing dev extra fails instead of skipping. Oracle: pytest's own exit status and summary for a
one-test file run with and without CI=true."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("ci,outcome", [("", "1 skipped"), ("true", "1 failed")])
def test_missing_dev_extra_fails_under_ci_and_skips_elsewhere(tmp_path, ci, outcome):
    (tmp_path / "test_one.py").write_text("import pytest\n\ndef test_needs_it():\n"
                                          "    pytest.importorskip('no_such_dev_extra_xyz')\n")
    env = dict(os.environ, CI=ci, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "src")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-rs", "-p", "no:cacheprovider",
                          str(tmp_path / "test_one.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert outcome in run.stdout, run.stdout[-2000:]
    assert (run.returncode == 0) == (ci == "")
    if ci:
        assert "pip install -e '.[dev]'" in run.stdout
