"""`python -m model.chat`: a multi-turn chat that keeps the cache between turns, on the tiny text
checkpoint (tests/text_checkpoint.py; greedy decoding after a newline writes REPLY, then
<|im_end|>). The wired model's next token depends on the last token only, so the cache-append
checks compare the decoder's whole state (KV cache, GDN conv and recurrent states, which depend on
every token and position) with a fresh prefill of the same conversation. CPU path, forced."""
import io
import subprocess
import sys

import pytest
import torch

from model.chat import CacheFullError, ChatSession
from model.chat_template import ChatTemplate
from model.checkpoint import load_checkpoint
from model.decoder import Decoder
from model.generation import Generator
from tests.text_checkpoint import CHAT_TEMPLATE, IM_END, REPLY, reply_chain, train_tokenizer, write_checkpoint

MAX_NEW = 8
MAX_NEW_DEFAULT = 512      # --max-new-tokens by default


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("chat_ckpt")
    write_checkpoint(path, chain=reply_chain(tok, tok.encode("hi\n").ids[-1]), tokenizer=tok)
    return path


@pytest.fixture
def cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _session(ckpt, tok, *, max_seq=64, max_new=MAX_NEW, template=None, system=None):
    cfg, w = load_checkpoint(ckpt, device="cpu", dtype=torch.float32, verbose=False)
    gen = Generator(Decoder(cfg, w, max_batch=1, max_seq=max_seq, backend="reference"), use_graph=False)
    template = template or ChatTemplate(CHAT_TEMPLATE)
    return ChatSession(gen, tok, template, eos_token_ids=(IM_END,), max_new_tokens=max_new, system=system,
                       out=io.StringIO(), err=io.StringIO())


def _ids(tok, messages):
    return tok.encode(ChatTemplate(CHAT_TEMPLATE).render(messages), add_special_tokens=False).ids


def _state(dec):
    s = dec.state
    return [t.clone() for t in (s.kv, s.conv, s.recurrent, dec.logits)]


def test_second_turn_is_appended_and_equals_a_fresh_prefill_of_the_conversation(ckpt, tok):
    chat = _session(ckpt, tok, system="Be brief.")
    dec = chat.decoder
    t1 = chat.send("hi")
    assert chat.out.getvalue() == REPLY and t1.text == REPLY and t1.tokens[-1] == IM_END
    assert (t1.start, t1.appended, t1.stop_reason) == (0, False, "eos")
    ids1 = _ids(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert dec.next_positions[0] == chat.position == len(ids1) + len(t1.tokens) - 1
    assert chat.pending == IM_END                # sampled, never fed

    t2 = chat.send("héllo 日本?")
    assert chat.out.getvalue() == REPLY + REPLY and t2.text == REPLY
    history = chat.messages
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    ids2 = _ids(tok, history[:4])               # the whole conversation the second turn prefills
    # appended where turn 1 stopped, starting with its pending <|im_end|>: only the new part is prefilled
    assert t2.appended and t2.start == len(ids1) + len(t1.tokens) - 1
    assert ids2[t2.start] == IM_END and t2.prompt_tokens == len(ids2) - t2.start
    assert dec.next_positions[0] == chat.position == len(ids2) + len(t2.tokens) - 1
    assert "note:" not in chat.err.getvalue()
    after_chat = _state(dec)

    for t in (dec.state.kv, dec.state.conv, dec.state.recurrent, dec.logits):
        t.fill_(float("nan"))                  # poison: the fresh run (reset, then one prefill) writes it all
    fresh = chat.generator.generate([ids2], MAX_NEW, eos_token_ids=(IM_END,))
    assert fresh.tokens[0] == t2.tokens
    assert dec.next_positions[0] == len(ids2) + len(t2.tokens) - 1
    for a, b in zip(after_chat, _state(dec)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_reply_cut_by_the_budget_is_continued_from_its_last_token(ckpt, tok):
    chat = _session(ckpt, tok, max_new=1)
    t1 = chat.send("hi")
    assert t1.stop_reason == "length" and t1.text == "héllo" and chat.pending == t1.tokens[0] != IM_END
    t2 = chat.send("hi")
    ids2 = _ids(tok, chat.messages[:3])
    assert t2.appended and ids2[t2.start] == t1.tokens[0]     # the cut reply's last token heads the prompt
    assert chat.position == len(ids2) == t2.start + t2.prompt_tokens


def test_reset_starts_over_from_an_empty_cache(ckpt, tok):
    chat = _session(ckpt, tok, system="Be brief.")
    chat.send("hi")
    first = (chat.position, _state(chat.decoder))
    chat.send("more")
    assert chat.position > first[0]
    chat.reset()
    assert chat.position == 0 and chat.pending is None and chat.messages == [{"role": "system", "content": "Be brief."}]
    assert chat.decoder.next_positions[0] == 0
    t = chat.send("hi")
    assert t.start == 0 and not t.appended and chat.position == first[0]
    for a, b in zip(first[1], _state(chat.decoder)):     # nothing left of the longer conversation
        assert torch.equal(a, b)


def test_a_turn_that_does_not_fit_is_refused_and_changes_nothing(ckpt, tok):
    need1 = len(_ids(tok, [{"role": "user", "content": "hi"}])) + MAX_NEW - 1
    chat = _session(ckpt, tok, max_seq=need1 + 2)
    chat.send("hi")
    before = (list(chat.fed), chat.pending, list(chat.messages), list(chat.decoder.next_positions),
              _state(chat.decoder))
    with pytest.raises(CacheFullError, match=rf"the conversation fills the cache \(\d+ of {need1 + 2} positions: "
                                             rf"{chat.position} held, .*\): /reset to start over"):
        chat.send("hi")
    assert (chat.fed, chat.pending, chat.messages, chat.decoder.next_positions) == tuple(before[:4])
    for a, b in zip(before[4], _state(chat.decoder)):
        assert torch.equal(a, b)
    chat.reset()
    assert chat.send("hi").text == REPLY                  # after /reset the same turn runs again


def test_a_template_that_rerenders_history_differently_prefills_it_again(ckpt, tok):
    # drops the assistant's replies from the history, as reasoning templates drop thinking
    source = CHAT_TEMPLATE.replace("message.content + '<|im_end|>", "(message.content if message.role != "
                                   "'assistant' else 'ok') + '<|im_end|>")
    template = ChatTemplate(source)
    chat = _session(ckpt, tok, template=template)
    chat.send("hi")
    t2 = chat.send("hi")
    full = tok.encode(template.render(chat.messages[:3]), add_special_tokens=False).ids
    assert t2.start == 0 and not t2.appended and t2.prompt_tokens == len(full)
    assert chat.position == len(full) + len(t2.tokens) - 1 and t2.text == REPLY
    assert "renders the earlier turns differently" in chat.err.getvalue()


class _Interrupting(io.StringIO):
    def write(self, text):
        raise KeyboardInterrupt


def test_an_interrupted_reply_is_dropped_and_the_next_turn_prefills_again(ckpt, tok):
    chat = _session(ckpt, tok)
    chat.send("hi")
    history = list(chat.messages)
    chat.out = _Interrupting()
    with pytest.raises(KeyboardInterrupt):
        chat.send("more")                            # Ctrl-C while the reply streams
    assert chat.messages == history and chat.fed == [] and chat.pending is None
    chat.out = io.StringIO()
    t = chat.send("more")
    ids = _ids(tok, chat.messages[:3])
    assert t.start == 0 and t.text == REPLY and chat.position == len(ids) + len(t.tokens) - 1
    assert "renders the earlier turns differently" not in chat.err.getvalue()


# ---- the command line ---------------------------------------------------------------------------
def _main(argv, script, monkeypatch, capsys):
    from model.chat import main
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code = main(argv)
    return code, capsys.readouterr()


def test_main_streams_turns_resets_and_refuses_a_full_cache(ckpt, tok, cpu, monkeypatch, capsys):
    need1 = len(_ids(tok, [{"role": "user", "content": "hi"}])) + MAX_NEW - 1
    argv = ["--checkpoint", str(ckpt), "--max-seq", str(need1 + 2), "--max-new-tokens", str(MAX_NEW)]
    code, res = _main(argv, "hi\n\nhi\n/reset\nhi\n", monkeypatch, capsys)
    assert code == 0
    assert res.out == f"{REPLY}\n{REPLY}\n"              # the refused turn printed no reply
    assert "chat: the conversation fills the cache (" in res.err
    assert f" of {need1 + 2} positions: " in res.err and "/reset to start over" in res.err
    assert "conversation reset" in res.err and "Traceback" not in res.err


@pytest.mark.parametrize("script,replies", [("hi\n/exit\nhi\n", 1), ("hi\nhi", 2), ("", 0), ("/exit\n", 0)])
def test_main_exit_and_end_of_input_end_with_0(ckpt, cpu, monkeypatch, capsys, script, replies):
    code, res = _main(["--checkpoint", str(ckpt), "--max-seq", "64", "--max-new-tokens", str(MAX_NEW)],
                      script, monkeypatch, capsys)
    assert code == 0 and res.out == f"{REPLY}\n" * replies


def test_main_first_message_too_long_says_so(ckpt, cpu, monkeypatch, capsys):
    code, res = _main(["--checkpoint", str(ckpt), "--max-seq", "12", "--max-new-tokens", "4"], "hi\n",
                      monkeypatch, capsys)
    assert code == 0 and res.out == ""
    assert "the message is too long for the cache (14 of 12 positions: 11 for the conversation" in res.err


def test_memory_plan_shrinks_the_default_cache_or_refuses(ckpt, cpu, monkeypatch, capsys):
    import model.memory_plan as mp
    from model.chat import main
    from model.config import ModelConfig

    cfg = ModelConfig.from_hf(ckpt)
    plan = mp.decode_memory(cfg, batch=1, max_seq=1024, dtype_bytes=4, backend="reference")
    monkeypatch.setattr(mp, "free_memory", lambda device: (mp.RESERVE_MIN + sum(plan.values()), "host memory"))
    code, res = _main(["--checkpoint", str(ckpt)], "", monkeypatch, capsys)     # 4096 -> 2048 -> 1024
    assert code == 0 and "note: the cache holds 1024 positions (4096 would not fit in the free memory)" in res.err
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(ckpt), "--max-seq", "2048"])                  # asked for: no shrinking
    assert info.value.code == 2
    assert "not enough memory: --checkpoint" in capsys.readouterr().err
    monkeypatch.setattr(mp, "free_memory", lambda device: (mp.RESERVE_MIN, "host memory"))
    with pytest.raises(SystemExit) as info:
        main(["--checkpoint", str(ckpt)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"({MAX_NEW_DEFAULT + 64} cache positions) needs" in err and "nothing was allocated" in err


def test_chat_end_to_end_as_a_user_runs_it(ckpt):
    import os
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "model.chat", "--checkpoint", str(ckpt), "--max-seq", "64",
                        "--max-new-tokens", str(MAX_NEW), "--system", "Be brief."],
                       input="hi\nhow are you\n".encode(), capture_output=True, timeout=300, env=env)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0, err
    assert r.stdout.decode("utf-8").splitlines() == [REPLY, REPLY]
    assert "Traceback" not in err and "renders the earlier turns differently" not in err


@pytest.mark.parametrize("argv,needle", [
    ([], "the following arguments are required: --checkpoint"),
    (["--max-new-tokens", "0"], "expected a positive integer, got 0"),
    (["--max-seq", "5000"], "--max-seq 5000 is beyond the model's max_position_embeddings=4096"),
    (["--max-seq", "64", "--max-new-tokens", "64"], "--max-new-tokens 64 leaves no room for the conversation"),
    (["--max-new-tokens", "10000000000"], "leaves no room for the conversation in the 4096-position cache"),
    (["--temperature", "inf"], "--temperature: expected a finite number"),
    (["--top-p", "0"], "--top-p: expected a finite number in (0, 1]"),
    (["--top-k", "-1"], "--top-k: expected an integer >= 0"),
    (["--top-k", "1000"], "--top-k 1000 is larger than the vocabulary (320)"),
    (["--seed", "-1"], "--seed: expected a seed"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--device-loop", "while"], "--device-loop while replays the decode step as a CUDA graph: it needs a CUDA GPU"),
    (["--group-size", "64"], "--group-size applies when quantizing: add --quant int4 (or int4-dequant)"),
    (["--quant", "int4", "--group-size", "32"], "--quant int4: layers.0.moe.down_proj: K=16 (shape [8, 32, 16]) is "
                                                "not a multiple of group_size=32; int4 groups run along K, so K must "
                                                "be a whole number of groups (no group size of [32, 64, 128] divides "
                                                "it: this model cannot be int4)"),
])
def test_bad_flags_exit_2_before_loading_weights(ckpt, cpu, monkeypatch, capsys, argv, needle):
    import model.checkpoint
    from model.chat import main

    monkeypatch.setattr(model.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("weights loaded"))
    full = argv if argv == [] else ["--checkpoint", str(ckpt), *argv]
    with pytest.raises(SystemExit) as info:
        main(full)
    assert info.value.code == 2
    res = capsys.readouterr()
    assert needle in res.err and res.out == ""


def test_checkpoint_without_tokenizer_or_template_exits_2(tmp_path, tok, cpu, capsys):
    from model.chat import main

    def refused(path, *extra):
        with pytest.raises(SystemExit) as info:
            main(["--checkpoint", str(path), *extra])
        assert info.value.code == 2
        return capsys.readouterr().err

    assert "no such directory" in refused(tmp_path / "missing")
    no_template = tmp_path / "no_template"
    write_checkpoint(no_template, tokenizer=tok, chat_template=None)
    assert "a chat needs a chat template" in refused(no_template)
    no_system = tmp_path / "no_system"
    write_checkpoint(no_system, tokenizer=tok, chat_template="{% if messages[0].role == 'system' %}"
                                                            "{{ raise_exception('no system messages') }}{% endif %}x")
    err = refused(no_system, "--system", "Be brief.")
    assert "--system: " in err and "refused the messages: no system messages" in err
    (no_template / "tokenizer.json").unlink()
    assert "a chat needs the checkpoint's tokenizer.json" in refused(no_template)
