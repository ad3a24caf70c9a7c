"""Chunked prefill over int4 weights (model.prefill with a model.quant.layout int4 ModelWeights) on
the CPU: the reference backend equals the bf16 path on the dequantized weights exactly, the Triton
backend (interpreter) equals the reference backend, also through a padded chunk, and the
workspaces are what workspace_bytes says. Tiny preset with expert widths 32 (int4 groups of 32)."""
import dataclasses

import pytest
import torch

from model.config import ModelConfig
from model.decoder import Decoder
from model.prefill import PrefillStep
from model.quant import QuantizedLinear
from model.quant.layout import dequantize_weights, quantize_weights
from model.weights import random_weights

CFG = dataclasses.replace(ModelConfig.preset("tiny"), moe_intermediate_size=32, shared_expert_intermediate_size=32)


def _states(dec):
    s = dec.state
    return [t.clone() for t in (s.kv, s.conv, s.recurrent)]


def _prompt(n, seed):
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.fixture(scope="module")
def int4_fp32():
    w = random_weights(CFG, "cpu", torch.float32, seed=1)
    return quantize_weights(w, 32, "rtn", lm_head="int4")


@pytest.mark.parametrize("dtype,lm_head", [(torch.float32, "int4"), (torch.bfloat16, "bf16")])
def test_reference_int4_prefill_is_the_bf16_path_on_dequantized_weights(dtype, lm_head):
    """Every linear of the layout is int4 (and the lm_head where asked): the int4 reference ops are
    the bf16 ops on the dequantized weights, so logits and states are bit-equal."""
    wq = quantize_weights(random_weights(CFG, "cpu", dtype, seed=2), 32, "rtn", lm_head=lm_head)
    assert isinstance(wq.layers[0].mixer.in_proj, QuantizedLinear) and isinstance(wq.layers[3].moe.gate_up_proj,
                                                                                   QuantizedLinear)
    assert isinstance(wq.lm_head, QuantizedLinear) == (lm_head == "int4")
    ps = [_prompt(21, 3), _prompt(4, 4)]
    runs = []
    for w in (wq, dequantize_weights(wq)):
        dec = Decoder(CFG, w, max_batch=2, max_seq=64, backend="reference")
        dec.prefill_step(16)
        dec.logits.fill_(float("nan"))
        runs.append((dec.prefill(ps).clone(), _states(dec)))
    assert not torch.isnan(runs[0][0]).any()
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_triton_int4_prefill_equals_the_reference_backend(int4_fp32):
    """fp32, chunks of 16, every linear and the lm_head int4. Triton: prompt 0 as a full chunk then
    a padded one (5 valid tokens of 16, junk after); reference: the same prompt with an unpadded
    second chunk of 5. Then a short prompt in row 1 on both. Last-token logits and every state
    (KV cache, conv, recurrent) within 1e-4: the int4 GEMMs, grouped experts and lm_head GEMV
    match their references, and the padding reaches no valid output."""
    p0, p1 = _prompt(21, 5), _prompt(3, 6)
    second = {"reference": p0[16:], "triton": p0[16:] + _prompt(11, 7)}
    runs = []
    for backend in ("reference", "triton"):
        dec = Decoder(CFG, int4_fp32, max_batch=2, max_seq=64, backend=backend)
        step = dec.prefill_step(16)
        step.logits.fill_(float("nan"))
        step.forward(torch.tensor(p0[:16]), torch.tensor([0, 0, 16]))
        l0 = step.forward(torch.tensor(second[backend]), torch.tensor([0, 16, 5])).clone()
        l1 = step.forward(torch.tensor(p1), torch.tensor([1, 0, 3])).clone()
        runs.append((l0, l1, _states(dec)))
    (r0, r1, rs), (t0, t1, ts) = runs
    assert not torch.isnan(t0).any() and not torch.isnan(t1).any()
    assert _rel(t0, r0) <= 1e-4 and _rel(t1, r1) <= 1e-4
    for x, y in zip(ts, rs):
        assert float((x - y).abs().max()) <= 1e-4 * max(1.0, float(y.abs().max()))
    assert ts[0][:, :, 0, :, 21:].abs().max() == 0      # no cache slot past the valid tokens written


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_workspace_bytes_hold_for_int4(int4_fp32, backend):
    """The int4 ops need no workspace of their own: a step over int4 weights holds exactly what
    workspace_bytes plans from the shapes."""
    dec = Decoder(CFG, int4_fp32, max_batch=1, max_seq=64, backend=backend)
    step = PrefillStep(dec, 32)
    assert step.nbytes() == PrefillStep.workspace_bytes(CFG, 32, torch.float32, backend) > 0


def test_int4_prefill_launches_at_35b_shapes_are_valid():
    """tools/int4_compile --prefill's record: the 35b-a3b model with every linear and the lm_head
    int4 (meta tensors, H200 profile) through PrefillStep.forward at chunks of 16 and 2048. Every
    projection takes the int4 GEMM (no cuBLAS call could take a QuantizedLinear), the experts the
    int4 grouped kernels, the lm_head the int4 GEMV (batch 1: the whole-row kernel); no launch breaks
    launch_audit's rules."""
    from model.ops import _util
    from model.ops.hardware import DeviceProfile
    from tools import int4_compile, launch_audit

    h200 = DeviceProfile.preset("h200")
    log = int4_compile.record_prefill(h200, "35b-a3b", (16, 2048), 128)
    kernels = [L.kernel for L in log]
    assert {"_gemm_int4_kernel", "_moe_gate_up_int4_gemm_kernel", "_moe_down_int4_gemm_kernel",
            "_moe_shared_combine_int4_kernel", "_gemv_int4_rows_kernel"} <= set(kernels)
    assert "_gemv_kernel" not in kernels and "_moe_gate_up_gemm_kernel" not in kernels
    # per chunk and layer: in_proj/out_proj (linear attention) or qkv/o_proj, and router_shared
    assert kernels.count("_gemm_int4_kernel") == 2 * 40 * 3
    for L in log:
        assert not launch_audit.problems(L, h200, pdl_enabled=_util.HAVE_GDC), L
        assert not L.options.get("launch_pdl")     # a prefill step launches without PDL by default
