"""Text in and out: incremental decoding of streamed tokens (multi-byte characters split across
tokens), the chat template (found, rendered as its authors intend, its errors named), and
`python -m model.generate` end to end on a tiny checkpoint with a real byte-level BPE tokenizer
trained here (tests/text_checkpoint.py; nothing downloaded)."""
import io
import json
import subprocess
import sys

import pytest

from model.chat_template import (ChatTemplate, ChatTemplateError, apply_chat_template,
                                 find_chat_template)
from model.streaming import TokenPrinter
from tests.text_checkpoint import (CHAT_TEMPLATE, ENDOFTEXT, IM_END, REPLY, reply_chain,
                                   train_tokenizer, write_checkpoint)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 日本?"}]
RENDERED = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo 日本?<|im_end|>\n"
            "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    """Wired so that greedy decoding after a newline writes REPLY, then <|im_end|>."""
    path = tmp_path_factory.mktemp("text_ckpt")
    newline = tok.encode("hi\n").ids[-1]
    write_checkpoint(path, chain=reply_chain(tok, newline), tokenizer=tok)
    return path


# ---- streaming ----------------------------------------------------------------------------------
def test_streamed_text_keeps_characters_split_across_tokens(tok):
    ids = tok.encode(REPLY + " hello").ids
    # the test is only meaningful if some character's bytes really are split across tokens
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    out = io.StringIO()
    printer = TokenPrinter(tok, out)
    pieces = [printer.push(t) for t in ids]
    printer.finish()
    assert out.getvalue() == REPLY + " hello" == printer.text
    assert "" in pieces                       # the first half of 日 waited for its second half
    assert "\ufffd" not in out.getvalue()


def test_stream_skips_special_tokens_and_flushes_an_unfinished_character(tok):
    out = io.StringIO()
    printer = TokenPrinter(tok, out)
    first_half = tok.encode(" 日").ids[0]
    for t in tok.encode("hi").ids + [IM_END, first_half]:
        printer.push(t)
    assert out.getvalue() == "hi"
    printer.finish()                          # output ended mid-character: say so, do not drop it
    assert out.getvalue().startswith("hi ") and out.getvalue().endswith("\ufffd")
    ids_only = io.StringIO()
    p = TokenPrinter(None, ids_only)
    p.push(5), p.push(17)
    p.finish()
    assert ids_only.getvalue() == "5 17 "


# ---- chat template ------------------------------------------------------------------------------
def test_chat_template_renders_messages_with_generation_prompt(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    assert apply_chat_template(tmp_path, MESSAGES) == RENDERED
    no_prompt = apply_chat_template(tmp_path, MESSAGES, add_generation_prompt=False)
    assert no_prompt == RENDERED[: -len("<|im_start|>assistant\n")]


def test_template_sources_in_transformers_order_and_environment(tmp_path):
    # tokenizer_config.json: a list of named templates, the default one used; special tokens given
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>",
        "chat_template": [{"name": "tool_use", "template": "T"},
                          {"name": "default", "template": "{{ bos_token }}{% for m in messages %}"
                                                          "{{ m.content | tojson }}{% endfor %}{{ eos_token }}"}]}))
    assert apply_chat_template(tmp_path, [{"role": "user", "content": "日本"}]) == '<s>"日本"</s>'
    # chat_template.json (multimodal processors) beats tokenizer_config.json; the .jinja file beats both
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json:{{ messages[0].content }}"}))
    assert apply_chat_template(tmp_path, MESSAGES) == "json:Be brief."
    # trim_blocks / lstrip_blocks as transformers renders: block tags leave no newline or indent behind
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}\n"
        "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}")
    found = find_chat_template(tmp_path)
    assert found[1].endswith("chat_template.jinja")
    assert apply_chat_template(tmp_path, MESSAGES) == "[héllo 日本?]\n"
    assert apply_chat_template(tmp_path, MESSAGES, enable_thinking=False) == "[héllo 日本?]\n<no-think>"


def test_chat_template_errors_name_the_file(tmp_path):
    assert ChatTemplate.from_checkpoint(tmp_path) is None
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        apply_chat_template(tmp_path, MESSAGES)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config.json: the chat template refused the "
                                                r"messages: unknown role tool"):
        apply_chat_template(tmp_path, [{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="message 1 must be a dict with a string 'role'"):
        apply_chat_template(tmp_path, [{"role": "user", "content": "x"}, {"content": "y"}])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}"}))
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config.json: the chat template is not valid jinja2 \(line 1"):
        apply_chat_template(tmp_path, MESSAGES)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(ChatTemplateError, match="field 'chat_template' must be a string, got 5"):
        apply_chat_template(tmp_path, MESSAGES)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages.__class__ }}"}))
    assert apply_chat_template(tmp_path, MESSAGES) == ""      # sandboxed: no reaching into Python
    (tmp_path / "chat_template.jinja").write_bytes(b"\xff\xfe")
    with pytest.raises(ChatTemplateError, match="chat_template.jinja is not UTF-8"):
        apply_chat_template(tmp_path, MESSAGES)


# ---- model.generate with a tokenizer -----------------------------------------------------------
def _run(argv, capsys):
    from model.generate import main
    assert main(argv) == 0
    return capsys.readouterr()


def test_generate_streams_multibyte_text_and_stops_on_generation_config_eos(ckpt, capsys):
    out = _run(["--checkpoint", str(ckpt), "--prompt", "hi\n", "--max-new-tokens", "8"], capsys).out
    lines = out.splitlines()
    assert lines[0] == "prompt (2 tokens): 'hi\\n'"
    assert lines[1] == REPLY                     # <|im_end|> ended it, and is not printed
    assert "stop: eos" in lines[2]                # config.json's eos is <|endoftext|>: only generation_config has <|im_end|>


def test_generate_chat_wraps_the_prompt_in_the_template(ckpt, tok, capsys):
    out = _run(["--checkpoint", str(ckpt), "--chat", "--prompt", "hi", "--max-new-tokens", "8"], capsys).out
    rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    n = len(tok.encode(rendered, add_special_tokens=False).ids)
    assert n == 11 and n > len(tok.encode("hi").ids) + 4   # the template's tokens are in the prompt
    assert out.splitlines()[0] == f"prompt ({n} tokens): 'hi' as a user turn of the chat template in tokenizer_config.json"
    assert out.splitlines()[1] == REPLY


def test_generate_prompt_ids_show_text_and_one_token_prompt_has_no_nan(ckpt, tok, capsys):
    newline = tok.encode("hi\n").ids[-1]
    res = _run(["--checkpoint", str(ckpt), "--prompt-ids", str(newline), "--max-new-tokens", "2"], capsys)
    lines = res.out.splitlines()
    assert lines[0] == f"prompt (1 tokens): [{newline}] = '\\n'"
    assert lines[1] == "héllo \ufffd"            # 2 tokens: héllo, then half of 日 (the output ends mid-character)
    assert "nan" not in res.out and "time to first token" in lines[-1] and "(prefill 1 tok," in lines[-1]


def test_generate_cpu_says_bfloat16_is_not_used(capsys, monkeypatch):
    monkeypatch.setattr(__import__("torch").cuda, "is_available", lambda: False)   # the CPU path's note
    err = _run(["--prompt-ids", "1,2", "--max-new-tokens", "1", "--dtype", "bfloat16"], capsys).err
    assert "in float32 (--dtype bfloat16 is not used there)" in err
    assert "random weights: its tokens mean nothing" in err


@pytest.mark.parametrize("argv,needle", [
    (["--prompt", ""], "--prompt '' encodes to no tokens"),
    (["--prompt-ids", "1", "--chat"], "--chat wraps --prompt text in the chat template: give --prompt"),
    (["--prompt", "hi", "--max-new-tokens", "5000"], "a 1-token prompt and --max-new-tokens 5000 need 5000 positions, "
                                                      "beyond the model's max_position_embeddings=4096; use "
                                                      "--max-new-tokens 4096 or less"),
])
def test_generate_text_inputs_refused(ckpt, capsys, argv, needle):
    from model.generate import main
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(ckpt), *argv])
    assert info.value.code == 2
    res = capsys.readouterr()
    assert needle in res.err and res.out == ""   # refused before the prompt line is printed


def test_generate_chat_without_a_template_is_refused(tmp_path, tok, capsys):
    write_checkpoint(tmp_path, tokenizer=tok, chat_template=None, generation_eos=None)
    from model.generate import main
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(tmp_path), "--chat", "--prompt", "hi"])
    assert info.value.code == 2 and "has no chat template" in capsys.readouterr().err


def test_generate_streams_utf8_to_a_pipe(ckpt):
    """As a user runs it (stdout a pipe): the bytes are UTF-8 and whole, no replacement character."""
    r = subprocess.run([sys.executable, "-m", "model.generate", "--checkpoint", str(ckpt), "--chat",
                        "--prompt", "hi", "--max-new-tokens", "8"], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    lines = r.stdout.decode("utf-8").splitlines()
    assert lines[1] == REPLY and "stop: eos" in lines[2]
    assert ENDOFTEXT != IM_END and "Traceback" not in r.stderr.decode(errors="replace")
