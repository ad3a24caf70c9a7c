"""Programmatic dependent launch (PDL) guards, checked on the source (CPU).

A kernel launched with the PDL attribute starts before its predecessor has finished; it is only
correct if it waits (pdl_wait) before touching anything an earlier kernel writes. These tests keep
every decode kernel on the same contract: it takes USE_GDC, calls pdl_wait(USE_GDC), and every
launch passes the launch options from pdl()."""
import ast
from pathlib import Path

import pytest
import torch

from model.ops import _util

OPS = sorted((Path(__file__).resolve().parents[1] / "model" / "ops").rglob("*.py"))


def _kernels(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
            if any("jit" in ast.unparse(d) for d in node.decorator_list):
                yield node


def _launches(tree):
    """Calls of the form some_kernel[grid](...)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            name = ast.unparse(node.func.value)
            if name.endswith("_kernel"):
                yield name, node


@pytest.mark.parametrize("path", OPS, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_kernel_waits_and_every_launch_passes_the_pdl_options(path):
    tree = ast.parse(path.read_text())
    for fn in _kernels(tree):
        params = [a.arg for a in fn.args.args]
        assert "USE_GDC" in params, f"{path.name}: {fn.name} takes no USE_GDC"
        calls = [ast.unparse(c) for c in ast.walk(fn) if isinstance(c, ast.Call)]
        assert "pdl_wait(USE_GDC)" in calls, f"{path.name}: {fn.name} never calls pdl_wait(USE_GDC)"
    # names bound to pdl(...) (e.g. opts = pdl(out)) count as the options too
    bound = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
             and ast.unparse(node.value).startswith("pdl(") for t in node.targets if isinstance(t, ast.Name)}
    for name, call in _launches(tree):
        star = [ast.unparse(k.value) for k in call.keywords if k.arg is None]
        assert any(s.startswith("pdl(") or s in bound for s in star), \
            f"{path.name}: {name} launched without **pdl(...)"


def test_kernels_were_found():
    names = {fn.name for p in OPS for fn in _kernels(ast.parse(p.read_text()))}
    assert {"_gemv_kernel", "_moe_down_kernel", "_gated_delta_kernel", "_sample_reduce_kernel"} <= names


def test_pdl_is_off_for_cpu_tensors():
    assert _util.pdl(torch.zeros(1)) == {"USE_GDC": False}
