"""The framework seam on the CPU: which adapter a handle picks, the core importing no framework,
validation through the torch and CuPy adapters (CuPy's array logic on a numpy stand-in), and the
replay fast path's shape (no Python calls beyond the adapter's input check)."""
import ast
import importlib.util
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import cugraph_rt as cg
from cugraph_rt import framework
from cugraph_rt.validation import InputSpec, as_spec, validate_call
from tests import _fake_cupy

ROOT = Path(__file__).resolve().parents[1]
HAS_CUPY = importlib.util.find_spec("cupy") is not None


def test_torch_inputs_and_dtype_names_pick_torch():
    assert framework.pick_adapter({"x": torch.zeros(2)}).name == "torch"
    assert framework.pick_adapter({"x": InputSpec((2,), torch.int64)}).name == "torch"
    assert framework.pick_adapter({"x": ((2,), "bfloat16")}).name == "torch"   # names are torch's
    assert framework.pick_adapter({}).name == "torch"


def test_framework_argument_is_checked_and_named():
    with pytest.raises(ValueError, match="framework must be one of"):
        framework.pick_adapter({"x": torch.zeros(1)}, "jax")
    with pytest.raises(TypeError, match="framework must be None"):
        framework.pick_adapter({"x": torch.zeros(1)}, 3)
    ad = framework.get_adapter("torch")
    assert framework.pick_adapter({"x": np.zeros(1)}, ad) is ad   # an explicit adapter wins


def test_cupy_without_cupy_says_so(monkeypatch):
    # as on a machine without CuPy, also where it is installed
    import sys
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.delitem(sys.modules, "cugraph_rt.cupy_interop", raising=False)
    monkeypatch.setattr(framework, "_adapters", {k: v for k, v in framework._adapters.items() if k != "cupy"})
    with pytest.raises(ImportError, match="'cupy' needs the cupy package"):
        framework.pick_adapter({"x": np.zeros(2)})
    with pytest.raises(ImportError, match="cupy"):
        cg.GraphHandle(lambda x: x, {"x": InputSpec((2,), np.float32)})


def test_mixed_frameworks_are_refused_naming_the_inputs(monkeypatch):
    with _fake_cupy.installed(monkeypatch):
        with pytest.raises(TypeError, match=r"'x' is torch, 'y' is cupy"):
            framework.pick_adapter({"x": torch.zeros(1), "y": np.zeros(1)})


def test_core_and_handle_import_no_framework():
    code = textwrap.dedent("""
        import sys
        import cugraph_rt
        from cugraph_rt import capture, graph, handle, memory, stream, stream_pool, replay
        from cugraph_rt import framework, validation, buckets, nodes, errors, device
        bad = sorted(m for m in ("torch", "cupy", "numba", "jax") if m in sys.modules)
        assert not bad, bad
        try:
            cugraph_rt.GraphHandle(lambda x: x, {"x": ((2,), "float32")}, framework="torch")
        except cugraph_rt.CudaUnavailableError:
            pass     # no GPU here: the argument checks and the adapter came first
        assert "torch" in sys.modules    # only now, through the torch adapter
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_torch_adapter_validates_like_the_duck_typed_path():
    ad = framework.get_adapter("torch")
    specs = {"x": InputSpec((4, 2), torch.float32), "n": InputSpec((1,), torch.int64)}
    good = {"x": torch.zeros(4, 2), "n": torch.zeros(1, dtype=torch.int64)}
    assert validate_call(specs, good, device_index=0, adapter=ad) is None
    for bad, exc, msg in [
        ({**good, "x": torch.zeros(4, 3)}, cg.InputError, r"'x': expected shape \(4, 2\); given \(4, 3\)"),
        ({**good, "n": torch.zeros(1, dtype=torch.int32)}, cg.InputTypeError, "expected dtype torch.int64"),
        ({**good, "x": torch.zeros(2, 4).t()}, cg.InputError, "contiguous"),
        ({**good, "x": torch.zeros(4, 2, device="meta")}, cg.InputError, "given one on meta"),
        ({**good, "x": [1.0]}, cg.InputTypeError, "expected a tensor; got list"),
    ]:
        with pytest.raises(exc, match=msg):
            validate_call(specs, bad, device_index=0, adapter=ad)
    # CPU tensors never take the replay fast path (they go through pinned staging)
    slots = [("x", (4, 2), torch.float32, 0, 1 << 20, 32), ("n", (1,), torch.int64, 0, 2 << 20, 8)]
    assert ad.device_copies(slots, good) is None


def test_torch_adapter_dtypes():
    ad = framework.get_adapter("torch")
    assert ad.resolve_dtype("bfloat16") is torch.bfloat16 and ad.itemsize(torch.bfloat16) == 2
    with pytest.raises(TypeError, match="unknown dtype name 'float5'"):
        ad.resolve_dtype("float5")
    with pytest.raises(TypeError, match="input 'a'.*dtype"):
        as_spec("a", InputSpec((2,), np.float32), ad)


def test_cupy_adapter_array_logic_on_a_stand_in(monkeypatch):
    with _fake_cupy.installed(monkeypatch) as cp:
        ad = framework.pick_adapter({"x": cp.ndarray(np.zeros((4, 2), np.float32))})
        assert ad.name == "cupy" and framework.pick_adapter({"x": np.zeros(2)}) is ad
        assert framework.pick_adapter({"x": InputSpec((2,), np.float32)}) is ad
        spec = as_spec("x", ((4, 2), "float32"), ad)
        assert spec == InputSpec((4, 2), np.dtype(np.float32))
        specs = {"x": spec, "t": as_spec("t", np.zeros(3, np.int64), ad)}
        dev = cp.ndarray(np.arange(8, dtype=np.float32).reshape(4, 2))
        good = {"x": dev, "t": np.zeros(3, np.int64)}           # a host input is fine
        assert validate_call(specs, good, device_index=0, adapter=ad) is None
        for bad, exc, msg in [
            ({**good, "x": cp.ndarray(np.zeros((4, 2), np.float64))}, cg.InputTypeError, "expected dtype float32"),
            ({**good, "x": cp.ndarray(np.zeros((4, 2), np.float32), device=1)}, cg.InputError,
             "cuda:0; given one on cuda:1"),
            ({**good, "x": cp.ndarray(np.zeros((2, 4), np.float32).T)}, cg.InputError, "contiguous"),
            ({**good, "t": [0, 0, 0]}, cg.InputTypeError, "expected a cupy or numpy array; got list"),
        ]:
            with pytest.raises(exc, match=msg):
                validate_call(specs, bad, device_index=0, adapter=ad)
        slots = [("x", (4, 2), np.dtype(np.float32), 0, 4096, 32)]
        assert ad.device_copies(slots, {"x": dev}) == [(4096, dev.data.ptr, 32)]
        assert ad.device_copies(slots, {"x": dev[:2]}) is None             # other shape
        assert ad.device_copies(slots, {"x": dev._a}) is None              # host: staging path
        assert ad.narrow(dev, 0, 3).shape == (3, 2) and ad.narrow(dev, 1, 1).shape == (4, 1)
        assert ad.pointer(good["t"]) == good["t"].ctypes.data and not ad.on_device(good["t"])
        assert ad.nbytes(dev) == 32 and ad.itemsize("float32") == 4
        with pytest.raises(TypeError, match="unknown dtype"):
            ad.resolve_dtype(torch.float32)


# ---- the replay fast path: one named object, lean, used by every launch site -----------------
def _calls_in(fn) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}


def test_fast_replay_path_makes_no_python_calls_beyond_the_plan():
    # the fast path (up to `return self._call(inputs)`) may call only the adapter's input check,
    # the caller-stream query, the raw CUDA calls, and the error funnel on failure
    src = textwrap.dedent(inspect.getsource(cg.GraphHandle.__call__))
    fast = src.split("return self._call(inputs)")[0]
    calls = {ast.unparse(n.func) for n in ast.walk(ast.parse(fast + "\n        pass"))
             if isinstance(n, ast.Call)}
    allowed = {"len", "plan.device_copies", "order.caller_stream", "_record", "_wait", "_memcpy",
               "_launch", "check", "self._host"}
    assert calls <= allowed, calls - allowed
    assert {"plan.device_copies", "_launch", "_memcpy"} <= calls


def test_every_launch_site_goes_through_the_plan():
    handle_src = (ROOT / "cugraph_rt" / "handle.py").read_text()
    assert handle_src.count("_launch(") == 1 and "plan.exec_raw" in handle_src  # the fast path
    assert "._box" not in handle_src and not re.search(r"execs\[[^\]]*\]\.launch", handle_src)
    assert _calls_in(cg.GraphHandle._step) >= {"res.plans[bucket].launch"}


def test_tools_reach_into_no_private_fields():
    for path in (ROOT / "tools").glob("*.py"):
        text = path.read_text()
        for private in ("._res", "._fast", "._box", "._order", "._specs"):
            assert private not in text, f"{path.name} uses {private}"


def test_replay_plan_refuses_a_closed_graph():
    from types import SimpleNamespace
    from cugraph_rt.replay import ReplayPlan
    ex = SimpleNamespace(_box=[None])
    order = SimpleNamespace(stream_raw=None, stream_handle=7)
    plan = ReplayPlan(None, ex, order, [("x", (1,), torch.float32, 0, 16, 4)], None, ())
    assert plan.n_inputs == 1 and "inputs=['x']" in repr(plan)
    with pytest.raises(cg.ClosedError, match="closed"):
        plan.launch()
