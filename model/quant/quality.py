"""How much int4 changes a model: per-tensor reconstruction error (RTN vs HQQ), and the int4
model's logits against the bf16 model's, teacher-forced on the bf16 model's greedy tokens so that
every step compares the same context (issue 10's quality report; tools/quant_quality.py prints it)."""
from __future__ import annotations

import torch

from .layout import is_int4_field, map_weights
from .quantizers import quantize, relative_error


def tensor_errors(w, group_size: int, lm_head: str = "bf16", methods=("rtn", "hqq")) -> list[dict]:
    """One row per int4 field of w: {"name", "shape", method: relative Frobenius error, ...}. Stacked
    experts are quantized expert by expert (the same codes) to bound memory."""
    rows = []
    for name, t in w.tensors():
        if not is_int4_field(name, lm_head):
            continue
        row = {"name": name, "shape": list(t.shape)}
        for m in methods:
            if t.dim() == 3:
                num = sum(relative_error(t[e], quantize(t[e], group_size, m)) ** 2 * float(t[e].float().norm()) ** 2
                          for e in range(t.shape[0]))
                row[m] = (num / float(t.float().norm()) ** 2) ** 0.5
            else:
                row[m] = relative_error(t, quantize(t, group_size, m))
        rows.append(row)
    return rows


def logit_metrics(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Compare logits a (int4) with b (reference), both [V] or [T, V]: mean over rows of the
    relative error ||a - b|| / ||b||, KL(softmax b || softmax a), top-1 agreement, and the mean
    overlap of the top-5 sets (in [0, 1])."""
    a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
    if a.shape != b.shape:
        raise ValueError(f"logit_metrics: shapes differ: {list(a.shape)} vs {list(b.shape)}")
    rel = ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).mean()
    lb, la = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
    kl = (lb.exp() * (lb - la)).sum(-1).mean()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean()
    ta, tb = a.topk(5, -1).indices, b.topk(5, -1).indices
    top5 = (ta.unsqueeze(-1) == tb.unsqueeze(-2)).any(-1).float().sum(-1).div(5).mean()
    return {"rel_err": float(rel), "kl": float(kl), "top1": float(top1), "top5": float(top5)}


@torch.no_grad()
def teacher_forced_logits(dec_ref, dec_q, prompt: list, steps: int):
    """([steps + 1, V] reference logits, same for the int4 decoder): both prefill `prompt`, then
    both are fed the reference's greedy token at every step. Each row is copied: a Decoder returns
    views of one static logits buffer (and an fp32 tensor's .float() is that same view)."""
    ref, q = [dec_ref.prefill([prompt])[0].float().clone()], [dec_q.prefill([prompt])[0].float().clone()]
    for s in range(steps):
        tok = torch.tensor([int(ref[-1].argmax())], dtype=torch.int64, device=dec_ref.device)
        pos = torch.tensor([len(prompt) + s], dtype=torch.int64, device=dec_ref.device)
        ref.append(dec_ref.decode_step(tok, pos)[0].float().clone())
        q.append(dec_q.decode_step(tok.to(dec_q.device), pos.to(dec_q.device))[0].float().clone())
    return torch.stack(ref), torch.stack(q)


def with_init_std(w, std: float, seed: int = 0):
    """w with the embedding and every linear (lm_head too) redrawn from N(0, std^2): transformers'
    init regime (std 0.02), where a small random model is not chaotic."""
    g = torch.Generator(device=w.device).manual_seed(seed)
    return map_weights(w, lambda n, t: (torch.randn(t.shape, generator=g, device=t.device) * std).to(t.dtype)
                       if n == "embed" or is_int4_field(n, "int4") else t)
