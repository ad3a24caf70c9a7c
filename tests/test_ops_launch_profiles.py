"""Launch configurations of every decode kernel, for the device profiles of an A100 (sm_80, 108
SMs, no PDL), an L4 and an L40S (sm_89) and an H100/H200 (sm_90): the decode step runs on meta
tensors with the kernels recorded, not run (tools/launch_audit.py; its --compile also compiles each
launch offline for the profile's architecture and checks its shared memory)."""
import pytest
import torch

from model.ops import _util
from model.ops.hardware import INTERPRETER, PRESETS, DeviceProfile, profile_for, use_profile
from model.ops.linear.gemv import gemv_config, prefetch_max_programs
from model.ops.moe.decode import moe_launch_config
from model.settings import Settings
from tools import launch_audit

PROFILES = ["a100", "l4", "l40s", "h100", "h200"]


@pytest.fixture(scope="module")
def launches():
    return {name: launch_audit.record(PRESETS[name], "35b-a3b", (1, 8)) for name in PROFILES}


@pytest.mark.parametrize("name", PROFILES)
def test_every_decode_kernel_launch_is_valid_for_the_profile(launches, name):
    profile = PRESETS[name]
    log = launches[name]
    assert {L.kernel for L in log} == launch_audit.decode_kernel_names()   # every kernel covered
    bad = [(L.kernel, p) for L in log for p in launch_audit.problems(L, profile,
                                                                      pdl_enabled=_util.HAVE_GDC)]
    assert not bad, bad


@pytest.mark.parametrize("name", PROFILES)
def test_pdl_only_where_the_device_supports_it(launches, name):
    want = PRESETS[name].supports_pdl and _util.HAVE_GDC
    assert PRESETS[name].supports_pdl == (PRESETS[name].capability >= (9, 0))
    for L in launches[name]:
        assert L.constexprs["USE_GDC"] is want and bool(L.options.get("launch_pdl")) == want, L


def test_configurations_follow_the_sm_count(launches):
    # fewer SMs, fewer programs wanted: the GEMV and expert blocks stay larger on an L4 than an H100
    l4, h100, a100 = PRESETS["l4"], PRESETS["h100"], PRESETS["a100"]
    assert l4.fill_programs == 116 and h100.fill_programs == 264 and a100.fill_programs == 216
    n, k = 512, 4096   # an H100 wants 264 programs: 1 row each; an L4's 116 come at 4 rows
    assert gemv_config(1, n, k, 2, profile=l4).block_n > gemv_config(1, n, k, 2, profile=h100).block_n
    assert moe_launch_config(1, 2048, 512, 8, 512, l4).down_block_ho >= \
        moe_launch_config(1, 2048, 512, 8, 512, h100).down_block_ho
    assert prefetch_max_programs(h100) == 4096 and prefetch_max_programs(l4) < 4096
    # the same op launched under two profiles gets two grids
    grid = {name: [L.grid for L in launches[name] if L.kernel == "_gemv_kernel"] for name in ("l4", "h100")}
    assert grid["l4"] != grid["h100"]


def test_profile_lookup_and_settings():
    assert profile_for(torch.zeros(1)) is INTERPRETER and INTERPRETER.fill_programs == 1
    assert not INTERPRETER.supports_pdl and _util.pdl(torch.zeros(1)) == {"USE_GDC": False}
    with use_profile(PRESETS["h100"]):
        assert profile_for(torch.zeros(1)) is PRESETS["h100"] and _util.fill_programs(torch.zeros(1)) == 264
        assert _util.pdl(torch.zeros(1))["USE_GDC"] is _util.HAVE_GDC
    from model.settings import SETTINGS
    if SETTINGS.interpret:      # the CPU tests run under the interpreter
        assert _util.FILL_PROGRAMS == 1 and _util.INTERPRET
    else:                       # on a GPU: the current device's, read at import
        assert _util.FILL_PROGRAMS == profile_for(torch.zeros(1, device="cuda")).fill_programs
    assert Settings.from_env({"MODEL_PDL": "0"}).pdl is False
    assert Settings.from_env({}).pdl is True and Settings.from_env({"TRITON_INTERPRET": "true"}).interpret
    assert Settings.from_env({}).prefill_pdl is False and Settings.from_env({"MODEL_PREFILL_PDL": "1"}).prefill_pdl
    assert Settings.from_env({}).int4_rows is True
    assert Settings.from_env({"MODEL_INT4_ROWS": "off"}).int4_rows is False
    with pytest.raises(ValueError, match="MODEL_PREFILL_PDL='2'"):
        Settings.from_env({"MODEL_PREFILL_PDL": "2"})
    with pytest.raises(ValueError, match="MODEL_PDL='maybe'"):
        Settings.from_env({"MODEL_PDL": "maybe"})
    with use_profile(PRESETS["h100"]):
        from model.settings import SETTINGS
        off = Settings(interpret=SETTINGS.interpret, pdl=False)
        import model.ops._util as u
        saved = u.SETTINGS
        u.SETTINGS = off
        try:
            assert u.pdl(torch.zeros(1)) == {"USE_GDC": False}   # MODEL_PDL=0 wins over the device
        finally:
            u.SETTINGS = saved


def test_profile_fields_are_checked():
    with pytest.raises(ValueError, match="sm_count"):
        DeviceProfile("x", 0, (9, 0), 1, 1)
    with pytest.raises(ValueError, match="capability"):
        DeviceProfile("x", 1, (9,), 1, 1)
    with pytest.raises(ValueError, match="unknown device preset"):
        DeviceProfile.preset("b200")
    with pytest.raises(TypeError, match="profile must be a DeviceProfile"):
        with use_profile("h100"):
            pass
