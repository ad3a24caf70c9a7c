"""CUGRAPH_RT_REQUIRE_GPU=1 turns every skip into a failure naming its reason (a GPU run cannot
pass by skipping), and no test skips except through tests/needs.py."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.needs import REQUIRE_ENV, need_module, required, skip

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

PROBE = textwrap.dedent("""
    import pytest
    from tests.needs import need_module

    @pytest.mark.gpu
    def test_needs_a_gpu():
        assert False, "a GPU test ran without a GPU"

    def test_needs_a_module():
        need_module("no_such_module_for_cugraph_rt", "the probe")
""")


def _probe(tmp_path):
    """PROBE run with the variable set, in a process that sees no GPU (also on a GPU machine)."""
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", **{REQUIRE_ENV: "1"})
    # the repository's conftest as a plugin: its gpu-marker hook runs on the probe
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "tests.conftest",
           "--rootdir", str(tmp_path), "-o", "markers=gpu: probe", str(tmp_path / "test_probe.py")]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_skip_is_a_failure_under_the_variable(monkeypatch):
    for value, fails in (("", False), ("0", False), ("1", True), ("yes", True)):
        monkeypatch.setenv(REQUIRE_ENV, value)
        assert required() is fails
        # both caught: a skip where a failure is due must fail this test, not skip it
        with pytest.raises((pytest.fail.Exception, pytest.skip.Exception), match="the reason") as info:
            skip("the reason")
        assert info.type is (pytest.fail.Exception if fails else pytest.skip.Exception), (value, info.type)
    monkeypatch.delenv(REQUIRE_ENV)
    with pytest.raises((pytest.fail.Exception, pytest.skip.Exception), match="needs no_such_module_for_cugraph_rt") as info:
        need_module("no_such_module_for_cugraph_rt")
    assert info.type is pytest.skip.Exception


def test_require_gpu_run_without_a_gpu_fails_naming_the_reasons(tmp_path):
    """End to end, through the repository's conftest: a gpu-marked test and a missing module."""
    req = _probe(tmp_path)
    out = req.stdout + req.stderr
    assert req.returncode == 1, out
    # the GPU test fails in its setup (an error), the other in its body
    assert "1 failed, 1 error" in out and "skipped" not in out, out
    assert f"{REQUIRE_ENV}=1 turns this skip into a failure: GPU test: " in out, out
    assert "needs no_such_module_for_cugraph_rt (the probe)" in out, out
    assert "a GPU test ran without a GPU" not in out, out     # it failed before running


SKIP_CALLS = ("skip", "importorskip", "skipif", "xfail")


def _direct_skips(path):
    """(line, text) of every pytest.skip / importorskip / mark.skip(if) / xfail in a file."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in SKIP_CALLS:
            base = ast.unparse(node.value)
            if base in ("pytest", "pytest.mark"):
                yield node.lineno, ast.unparse(node)


def test_skips_go_through_needs(tmp_path):
    allowed = {TESTS / "needs.py", Path(__file__).resolve()}
    found = [f"{p.relative_to(ROOT)}:{line}: {text}" for p in sorted(TESTS.rglob("*.py")) if p not in allowed
             for line, text in _direct_skips(p)]
    assert not found, "skip through tests/needs.py (skip, need_module, need_free_gpu_memory) so that " \
                      f"{REQUIRE_ENV}=1 can turn it into a failure:\n" + "\n".join(found)
    # the guard finds what it looks for
    sample = tmp_path / "sample.py"
    sample.write_text("import pytest\nt = pytest.importorskip('x')\n@pytest.mark.skipif(True, reason='r')\n"
                      "def f():\n    pytest.skip('r')\n")
    assert sorted(t for _, t in _direct_skips(sample)) == ["pytest.importorskip", "pytest.mark.skipif", "pytest.skip"]
