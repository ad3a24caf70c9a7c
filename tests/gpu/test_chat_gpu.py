"""`python -m model.chat` on the GPU: the tiny text checkpoint (tests/text_checkpoint.py) through
the Triton kernels, the prefill graphs and the decode graph (and the device loop), two turns that
keep the cache, against a fresh prefill of the whole conversation."""
import io
import subprocess
import sys

import pytest
import torch

from tests.text_checkpoint import CHAT_TEMPLATE, IM_END, REPLY, reply_chain, train_tokenizer, write_checkpoint

pytestmark = pytest.mark.gpu
MAX_NEW = 8


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("chat_ckpt_gpu")
    write_checkpoint(path, chain=reply_chain(tok, tok.encode("hi\n").ids[-1]), tokenizer=tok)
    return path


@pytest.mark.parametrize("dtype,loop", [("float32", "off"), ("bfloat16", "while")])
def test_chat_as_a_user_runs_it_on_the_gpu(ckpt, dtype, loop):
    r = subprocess.run([sys.executable, "-m", "model.chat", "--checkpoint", str(ckpt), "--max-seq", "64",
                        "--max-new-tokens", str(MAX_NEW), "--system", "Be brief.", "--dtype", dtype,
                        "--device-loop", loop],
                       input="hi\nhow are you\n".encode(), capture_output=True, timeout=300)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0, err
    assert r.stdout.decode("utf-8").splitlines() == [REPLY, REPLY], err
    assert "Traceback" not in err and "no CUDA GPU" not in err


@pytest.mark.parametrize("device_loop", [False, "while"])
def test_two_turns_in_graphs_equal_a_fresh_prefill(ckpt, tok, device_loop):
    from model.chat import ChatSession
    from model.chat_template import ChatTemplate
    from model.checkpoint import load_checkpoint
    from model.decoder import Decoder
    from model.generation import Generator

    cfg, w = load_checkpoint(ckpt, device="cuda", dtype=torch.float32, verbose=False)
    gen = Generator(Decoder(cfg, w, max_batch=1, max_seq=64, backend="triton"), use_graph=True,
                    device_loop=device_loop)
    template = ChatTemplate(CHAT_TEMPLATE)
    with gen:
        chat = ChatSession(gen, tok, template, eos_token_ids=(IM_END,), max_new_tokens=MAX_NEW,
                           system="Be brief.", out=io.StringIO(), err=io.StringIO())
        t1 = chat.send("hi")
        t2 = chat.send("héllo 日本?")
        assert chat.out.getvalue() == REPLY + REPLY and t2.appended
        assert gen.handle.stats.replays > 0
        dec = chat.decoder
        ids2 = tok.encode(template.render(chat.messages[:4]), add_special_tokens=False).ids
        assert dec.next_positions[0] == len(ids2) + len(t2.tokens) - 1
        s = dec.state
        after = [t.clone() for t in (s.kv, s.conv, s.recurrent)]
        for t in (s.kv, s.conv, s.recurrent):
            t.fill_(float("nan"))
        fresh = gen.generate([ids2], MAX_NEW, eos_token_ids=(IM_END,))
        assert fresh.tokens[0] == t2.tokens and t1.tokens[-1] == IM_END
        for a, b in zip(after, (s.kv, s.conv, s.recurrent)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
