"""The prefill step's kernel launches on meta tensors (tools/launch_audit.py --prefill): every
prefill kernel is reached at a small and a large chunk, and every launch keeps the rules (grid,
warps, power-of-two blocks, PDL where the profile has it) on an H200 and an A100 profile."""
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
    assert pdl == {profile.supports_pdl}
