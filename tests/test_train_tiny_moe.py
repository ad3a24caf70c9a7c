"""tools/train_tiny_moe.py: its arguments, and a short training run whose checkpoint our loader
reads and whose held-out loss fell."""
import json

import pytest

from tests.needs import need_module
from tools import train_tiny_moe


def test_ids_prints_the_bytes(capsys):
    assert train_tiny_moe.main(["--ids", "ab c"]) == 0
    assert capsys.readouterr().out.strip() == "97,98,32,99"


@pytest.mark.parametrize("argv, needle", [([], "--out is required"), (["--out", "x", "--lr", "0"], "--lr"),
                                          (["--out", "x", "--seq", "1"], "--seq"),
                                          (["--out", "x", "--steps", "0"], "--steps")])
def test_bad_arguments_are_refused(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        train_tiny_moe.parse_args(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_int4_groups_divide_every_k():
    cfg = train_tiny_moe.model_config()
    ks = {cfg.hidden_size, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size,
          cfg.num_attention_heads * cfg.head_dim, cfg.linear_num_value_heads * cfg.linear_value_head_dim}
    assert all(k % 32 == 0 and k % 64 == 0 for k in ks), ks


def test_a_short_run_learns_and_loads(tmp_path):
    need_module("transformers", "the tool trains with transformers")
    import torch

    from model.checkpoint import load_checkpoint

    out = tmp_path / "ckpt"
    assert train_tiny_moe.main(["--out", str(out), "--steps", "30", "--batch", "4", "--seq", "64",
                                "--corpus", "model/ops/*.py"]) == 0
    report = json.loads((out / "training.json").read_text())
    assert report["held_out_loss_after"] < report["held_out_loss_before"] - 0.3, report
    cfg, weights = load_checkpoint(out, device="cpu", verbose=False)
    assert cfg.num_experts == 16 and cfg.vocab_size == 256
    assert weights.embed.dtype == torch.bfloat16 and torch.isfinite(weights.embed.float()).all()
