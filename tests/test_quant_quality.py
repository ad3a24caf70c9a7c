"""The int4 quality report (model/quant/quality.py, tools/quant_quality.py): the logit metrics on
hand-made logits, and the tool end to end on the tiny preset for a few steps."""
import json

import pytest
import torch

from model.quant.quality import logit_metrics


def test_logit_metrics():
    b = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    same = logit_metrics(b, b)
    assert same == {"rel_err": 0.0, "kl": pytest.approx(0.0, abs=1e-7), "top1": 1.0, "top5": 1.0}
    a = b.clone()
    a[0, 5] = 7.0                                   # row 0: top-1 moves, the top-5 set stays
    a[1, 6] = 5.5                                   # row 1: token 6 enters the top 5, token 4 leaves it
    m = logit_metrics(a, b)
    assert m["top1"] == 0.5 and m["top5"] == pytest.approx((1 + 0.8) / 2)
    assert m["kl"] > 0.01 and m["rel_err"] == pytest.approx(float(((a - b).norm(dim=-1) / b.norm(dim=-1)).mean()))
    with pytest.raises(ValueError, match="shapes differ"):
        logit_metrics(a[:, :5], b)


def test_tool_on_the_tiny_preset(tmp_path, monkeypatch, capsys):
    from tools.quant_quality import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    assert main(["--preset", "tiny", "--layers", "2", "--steps", "3", "--group-size", "32", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r["tensors"]) == 6 * 2
    assert all(t["hqq"] <= t["rtn"] for t in r["tensors"])
    for m in ("rtn", "hqq"):
        x = r[f"logits_{m}"]
        assert 0 < x["rel_err"] < 0.5 and x["kl"] >= 0 and 0 <= x["top1"] <= 1
    assert "logits HQQ vs bf16 over 3 teacher-forced steps" in capsys.readouterr().out
    assert main(["--preset", "tiny", "--group-size", "64", "--steps", "1"]) == 2
    assert "K=32" in capsys.readouterr().err


def test_teacher_forced_rows_are_each_steps_logits():
    """Decoder returns views of one logits buffer; in fp32 teacher_forced_logits must copy each step's
    row (it used to stack the last step's logits steps + 1 times)."""
    import dataclasses

    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.quant import map_weights
    from model.quant.quality import teacher_forced_logits
    from model.weights import random_weights
    from tools.quant_quality import compare

    cfg = dataclasses.replace(ModelConfig.preset("tiny"), num_layers=2)
    w = map_weights(random_weights(cfg, "cpu", torch.bfloat16, seed=0), lambda n, t: t.float())
    dec, other = (Decoder(cfg, w, max_batch=1, max_seq=16, backend="reference") for _ in range(2))
    a, b = teacher_forced_logits(dec, other, [1, 2, 3], 4)
    assert a.shape == (5, cfg.vocab_size) and torch.equal(a, b)
    assert all(not torch.equal(a[i], a[i + 1]) for i in range(4))
    dec.reset()
    x = [dec.prefill([[1, 2, 3]])[0].clone()]
    for s in range(4):
        x.append(dec.decode_step(torch.tensor([int(x[-1].argmax())]), torch.tensor([3 + s]))[0].clone())
    assert torch.equal(torch.stack(x), a)
    dec.reset()
    other.reset()
    m = compare(dec, other, [1, 2, 3], 4)
    assert m["rel_err"] == 0 and m["rel_err_median"] == 0 and m["rel_err_p90"] == 0 and m["top1"] == 1


def test_tool_noise_reference(tmp_path, monkeypatch, capsys):
    from tools.quant_quality import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "r.json"
    assert main(["--preset", "tiny", "--layers", "1", "--steps", "2", "--group-size", "32", "--noise", "0.001,0.1",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    small, large = r["logits_noise_0.001"], r["logits_noise_0.1"]
    assert 0 < small["rel_err"] < large["rel_err"] and small["rel_err_median"] <= small["rel_err_p90"]
    assert "logits noise 0.1 vs bf16 over 2 teacher-forced steps" in capsys.readouterr().out
    assert main(["--preset", "tiny", "--group-size", "32", "--noise", "0,1"]) == 2
    assert "--noise wants" in capsys.readouterr().err
