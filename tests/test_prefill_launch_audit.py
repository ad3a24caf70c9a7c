"""The prefill step's kernel launches on meta tensors (tools/launch_audit.py --prefill): every
prefill kernel is reached at a small and a large chunk, and every launch keeps the rules (grid,
warps, power-of-two blocks) on an H200 and an A100 profile; PDL only with MODEL_PREFILL_PDL=1
(and a profile that has it), while the decode step keeps it."""
import dataclasses

import pytest

from model.ops.hardware import PRESETS
from tools import launch_audit


@pytest.mark.parametrize("name", ["h200", "a100"])
def test_every_prefill_kernel_launch_is_valid(name):
    profile = PRESETS[name]
    log = launch_audit.record_prefill(profile, "35b-a3b", (16, 4096))
    assert launch_audit.prefill_kernel_names() <= {L.kernel for L in log}
    for L in launch_audit.unique(log):
        assert not launch_audit.problems(L, profile), (L.kernel, launch_audit.problems(L, profile))
    pdl = {bool(L.options.get("launch_pdl")) for L in log}
    assert pdl == {False}    # MODEL_PREFILL_PDL unset: the prefill's many-wave kernels run without PDL


def test_prefill_pdl_follows_its_setting_and_leaves_decode_alone(monkeypatch):
    import model.prefill
    from model.ops import _util

    h200 = PRESETS["h200"]
    on = dataclasses.replace(model.prefill.SETTINGS, prefill_pdl=True)
    monkeypatch.setattr(model.prefill, "SETTINGS", on)
    log = launch_audit.record_prefill(h200, "35b-a3b", (16,))
    assert {bool(L.options.get("launch_pdl")) for L in log} == {_util.HAVE_GDC}
    monkeypatch.undo()
    decode = launch_audit.record(h200, "35b-a3b", (1,), quants=("bf16",))
    assert {bool(L.options.get("launch_pdl")) for L in decode} == {_util.HAVE_GDC}
    with _util.pdl_allowed(False):      # nested: an inner allow cannot turn it back on
        with _util.pdl_allowed(True):
            assert _util.pdl_options(h200) == {"USE_GDC": False}
    assert _util.pdl_options(h200)["USE_GDC"] is _util.HAVE_GDC
