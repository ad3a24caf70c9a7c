"""A tiny checkpoint with the text side of a real one, built on the spot (nothing downloaded):
a byte-level BPE tokenizer trained here with the `tokenizers` library, a Qwen-style chat template,
generation_config.json listing two end-of-sequence ids, and tiny-preset weights.

`wire_chain` makes greedy decoding deterministic and meaningful: every layer's output projections
are zeroed, so the residual stream is the token's embedding, and each chain token's embedding is a
basis vector whose lm_head row points at the next chain token. From the prompt's last token the
model then writes the chain exactly (here "héllo 日本", whose 日 is split across two tokens) and
ends with <|im_end|>, an end-of-sequence id only generation_config.json names.
"""
import dataclasses
import json

import torch
from safetensors.torch import save_file

from model.config import ModelConfig
from model.weights import random_weights

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ENDOFTEXT, IM_START, IM_END = 0, 1, 2          # ids of SPECIALS (added first by the trainer)
REPLY = "héllo 日本"
CORPUS = ["hello world", "the user says hello", "the assistant replies", "hi\n", REPLY]
# Qwen's layout, written for this test: one <|im_start|>role ... <|im_end|> block per message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if message.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message.role) }}{% endif %}\n"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")


def train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == [ENDOFTEXT, IM_START, IM_END]
    return tok


def text_config() -> ModelConfig:
    """The tiny preset with room for the tokenizer's 300 ids; config.json's eos is <|endoftext|>."""
    return dataclasses.replace(ModelConfig.preset("tiny"), vocab_size=320, eos_token_id=ENDOFTEXT)


def wire_chain(w, chain):
    """Greedy decoding from chain[0] writes chain[1:], in order (see the module doc)."""
    for L in w.layers:
        out = L.mixer.o_proj if hasattr(L.mixer, "o_proj") else L.mixer.out_proj
        for t in (out, L.moe.down_proj, L.moe.shared_down):
            t.zero_()
    w.final_norm.zero_()
    w.lm_head.zero_()
    assert len(chain) - 1 <= w.cfg.hidden_size and len(set(chain[:-1])) == len(chain) - 1
    for i, (src, dst) in enumerate(zip(chain, chain[1:])):
        w.embed[src].zero_()
        w.embed[src, i] = 1.0
        w.lm_head[dst, i] = 10.0
    return w


def write_checkpoint(path, *, chain=None, tokenizer=None, chat_template=CHAT_TEMPLATE,
                     generation_eos=(IM_END, ENDOFTEXT)):
    """Write the checkpoint into `path`; returns (cfg, tokenizer)."""
    path.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or train_tokenizer()
    cfg = text_config()
    w = random_weights(cfg, "cpu", torch.float32, seed=5)
    if chain is not None:
        wire_chain(w, chain)
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file({k: v.contiguous() for k, v in w.to_hf_state_dict().items()}, str(path / "model.safetensors"))
    tok.save(str(path / "tokenizer.json"))
    tok_cfg = {"eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>", "special": True}}
    if chat_template is not None:
        tok_cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    if generation_eos is not None:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": list(generation_eos),
                                                                 "do_sample": False}))
    return cfg, tok


def reply_chain(tok, prompt_last_id):
    """The chain the model is wired with: the prompt's last token, then REPLY's tokens, <|im_end|>."""
    return [prompt_last_id] + tok.encode(REPLY).ids + [IM_END]
