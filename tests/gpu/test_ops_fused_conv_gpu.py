"""The conv1d fused into the gated-delta decode kernel (model/ops/gated_delta/step.py ConvIn,
MODEL_FUSED_CONV) on the GPU at 35b-a3b GDN shapes (16 key heads, 32 value heads, 128 x 128,
conv width 4), as conv1d_update then the step over 20 steps: the same output and conv state, bit
for bit, and the recurrent state within fp32 ulps (the two kernels compile apart). On the GPU a
key head's programs run concurrently: storing its q/k state before every one of them had read
the old one would show here. Batches 1 and 8, and a graph replay."""
import dataclasses

import pytest
import torch

from tests.gpu._capture import capture_without_allocation

from model.ops import gated_delta
from model.ops.gated_delta import step
from model.settings import SETTINGS

pytestmark = pytest.mark.gpu

NK, NV, K, V, W = 16, 32, 128, 128, 4
C = 2 * NK * K + NV * V
DT = torch.bfloat16


def _inputs(b, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, device="cuda") * scale)
    proj = r(b, C + NV * V + 2 * NV).to(DT)
    qkv, z = proj[:, :C], proj[:, C:C + NV * V]
    bb, a = proj[:, C + NV * V:C + NV * V + NV], proj[:, C + NV * V + NV:]
    A_log = torch.log(torch.empty(NV, device="cuda").uniform_(0.5, 16, generator=g)).to(DT)
    dt_bias, nw = r(NV).to(DT), r(V).to(DT)
    return qkv, z, a, bb, A_log, dt_bias, nw, r(b, NV, K, V, scale=0.1), r(b, C, W).to(DT), r(C, W, scale=0.5).to(DT)


@pytest.mark.parametrize("b", [1, 8])
def test_fused_conv_equals_conv_then_step_at_35b_shapes(monkeypatch, b):
    qkv, z, a, bb, A_log, dt_bias, nw, state, cstate, cw = _inputs(b, 50 + b)
    runs = {}
    for fused in (False, True):
        monkeypatch.setattr(step, "SETTINGS", dataclasses.replace(SETTINGS, fused_conv=fused))
        conv = gated_delta.ConvIn(cstate.clone(), cw, gated_delta.gated_delta_conv_counters(b, NK, "cuda"),
                                  torch.full((b, C), float("nan"), dtype=DT, device="cuda"))
        st = state.clone()
        ws = gated_delta.gated_delta_workspace(b, NV, "cuda")
        out = torch.full((b, NV * V), float("nan"), dtype=DT, device="cuda")
        outs = []

        def one():
            gated_delta.gated_delta_step_triton(qkv, a, bb, A_log, dt_bias, st, out, NK, K, V, z=z, norm_weight=nw,
                                                eps=1e-6, workspace=ws, conv=conv)
        for p in range(20):
            qkv.mul_(-1)   # new inputs each step, the same for both runs
            one()
            outs.append(out.clone())
        torch.cuda.synchronize()
        assert int(conv.counters.abs().sum()) == 0 and int(ws.abs().sum()) == 0
        runs[fused] = (outs, st.clone(), conv.state.clone())
        if fused:
            snap = (st.clone(), conv.state.clone())
            one()
            torch.cuda.synchronize()
            eager = (out.clone(), st.clone(), conv.state.clone())
            st.copy_(snap[0])
            conv.state.copy_(snap[1])
            graph = capture_without_allocation(one, "the fused conv + gated delta")
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, eager[0]) and torch.equal(st, eager[1]) and torch.equal(conv.state, eager[2])
    for p, (u, f) in enumerate(zip(runs[False][0], runs[True][0])):
        assert torch.equal(u, f), p
    assert torch.equal(runs[False][2], runs[True][2])   # the conv state: bf16 copies of the inputs
    # The fp32 recurrent state: the same source, but the two specializations compile apart, so the
    # backend may contract a different multiply-add pair into an FMA: ulp-level, below what the bf16
    # outputs above (bit-equal) can show.
    su, sf = runs[False][1], runs[True][1]
    rel = float((su - sf).abs().max()) / float(su.abs().max())
    print(f"fused conv, batch {b}: recurrent state max |diff| / max |state| = {rel:.3g}, "
          f"{int((su != sf).sum())} of {su.numel()} elements differ")
    assert rel <= 1e-5, rel
