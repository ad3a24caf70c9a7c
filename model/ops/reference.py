"""The plain-torch backend: every op of the contract (see model/ops/__init__.py) as its reference."""
from .attention import (attention_num_splits, attention_workspace, attention_workspace_numel,  # noqa: F401
                        decode_attention_reference as decode_attention,
                        qk_norm_rope_store_reference as qk_norm_rope_store)
from .attention import prefill_attention_reference as prefill_attention  # noqa: F401
from .attention import qk_norm_rope_store_prefill_reference as qk_norm_rope_store_prefill  # noqa: F401
from .conv import conv1d_prefill_reference as conv1d_prefill  # noqa: F401
from .conv import conv1d_update_reference as conv1d_update  # noqa: F401
from .gated_delta import gated_delta_chunk_reference as gated_delta_chunk, gated_delta_chunk_workspace  # noqa: F401
from .moe import moe_experts_grouped_reference as moe_experts_grouped, moe_grouped_workspace  # noqa: F401
from .gated_delta import gated_delta_step_reference as gated_delta_step, gated_delta_workspace  # noqa: F401
from .loop_rows import advance_rows_reference as advance_rows, ctl_numel as loop_ctl_numel  # noqa: F401
# the ops that read a weight choose the bf16 or the int4 kernel by its type (dispatch.py)
from .dispatch import gemv_reference as gemv, norm_gemv_reference as norm_gemv  # noqa: F401
from .dispatch import moe_experts_reference as moe_experts  # noqa: F401
from .moe import moe_workspace, moe_workspace_numel  # noqa: F401
from .moe import router_topk_reference as router_topk  # noqa: F401
from .norm import add_rmsnorm_reference as add_rmsnorm, gated_rmsnorm_reference as gated_rmsnorm  # noqa: F401
from .norm import rmsnorm_reference as rmsnorm  # noqa: F401
from .sampling import make_params, make_rng_state, sample_workspace_numel  # noqa: F401
from .sampling import sample_reference as sample
from .sampling import Sampler as _Sampler

NAME = "reference"


def Sampler(vocab_size, batch, sampling=None, device="cpu"):
    return _Sampler(vocab_size, batch, sampling, device, backend="reference")


__all__ = ["gemv", "norm_gemv", "rmsnorm", "add_rmsnorm", "gated_rmsnorm", "conv1d_update", "gated_delta_step",
           "qk_norm_rope_store", "decode_attention", "router_topk", "moe_experts", "sample", "Sampler",
           "attention_workspace", "attention_workspace_numel", "attention_num_splits", "moe_workspace", "moe_workspace_numel",
           "sample_workspace_numel", "make_params", "make_rng_state", "gated_delta_workspace",
           # chunked prefill (T tokens of one row; info = (row, start, n_valid) on the device)
           "conv1d_prefill", "gated_delta_chunk", "gated_delta_chunk_workspace", "qk_norm_rope_store_prefill",
           "prefill_attention", "moe_experts_grouped", "moe_grouped_workspace",
           # the decode loop on the device (model/device_loop.py)
           "advance_rows", "loop_ctl_numel"]

# int4 weights (QuantizedLinear, docs/int4.md) in the chunked prefill: its GEMMs, grouped experts, lm_head
from .linear.int4 import gemv_int4_reference as gemv_int4  # noqa: E402,F401
from .linear.int4_gemm import gemm_int4_reference as gemm_int4  # noqa: E402,F401
from .moe.grouped_int4 import moe_experts_grouped_int4_reference as moe_experts_grouped_int4  # noqa: E402,F401

__all__ += ["gemm_int4", "gemv_int4", "moe_experts_grouped_int4"]
