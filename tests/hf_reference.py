"""Helpers for parity tests against Hugging Face transformers' Qwen3_5MoeForCausalLM."""
from __future__ import annotations

import torch


def hf_model(cfg, weights):
    """transformers' Qwen3_5MoeForCausalLM (eager experts and attention) holding `weights`."""
    from transformers import AutoModelForCausalLM

    hc = cfg.to_hf()
    model = AutoModelForCausalLM.from_config(hc, experts_implementation="eager", attn_implementation="eager",
                                             dtype=weights.dtype)
    missing, unexpected = model.load_state_dict(weights.to_hf_state_dict(), strict=True)
    assert not missing and not unexpected
    return model.to(weights.device).eval()


def _cache_kw(model):
    """transformers >= 5.2x names the cache argument `cache` (past_key_values deprecated); 5.17 has
    only past_key_values."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def hf_greedy(model, prompt, steps):
    """Prefill `prompt` then `steps` greedy decode steps: (list of [V] logits — prompt's last and
    one per step —, generated tokens)."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt], dtype=torch.int64, device=dev)
    kw = _cache_kw(model)
    out = model(input_ids=ids, use_cache=True, **{kw: cache})
    logits = [out.logits[0, -1].float()]
    tokens = []
    for s in range(steps):
        tok = int(logits[-1].argmax())
        tokens.append(tok)
        pos = torch.tensor([[len(prompt) + s]], device=dev)
        out = model(input_ids=torch.tensor([[tok]], device=dev), use_cache=True, position_ids=pos, **{kw: cache})
        logits.append(out.logits[0, -1].float())
    return logits, tokens


@torch.no_grad()
def ours_greedy(decoder, prompts, steps):
    """Prefill every prompt (row r = prompt r) then `steps` greedy steps of all rows together:
    (list per row of [V] logits, list per row of tokens)."""
    n = len(prompts)
    logits = decoder.prefill(prompts)
    per_row = [[logits[r].float().clone()] for r in range(n)]
    toks = [[] for _ in range(n)]
    pos = [len(p) for p in prompts]
    for s in range(steps):
        nxt = [int(per_row[r][-1].argmax()) for r in range(n)]
        for r in range(n):
            toks[r].append(nxt[r])
        positions = torch.tensor([p + s for p in pos], dtype=torch.int64)
        decoder.check_positions(positions)
        out = decoder.decode_step(torch.tensor(nxt, dtype=torch.int64, device=decoder.device),
                                  positions.to(decoder.device))
        for r in range(n):
            per_row[r].append(out[r].float().clone())
    return per_row, toks
