"""`torchrun --nproc-per-node N -m model.generate` on the CPU (gloo, reference backend): the same
output as the single-process command, printed by rank 0 alone, for a preset (random weights
sharded at creation) and a checkpoint with a tokenizer (each rank reading its slices); a rank count
that does not divide the model is refused naming the numbers, and the job ends instead of hanging."""
import subprocess
import sys

from tests.dist_launch import ROOT, child_env

TIMEOUT = 120


def _run(args, nproc=None):
    launch = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd = [sys.executable, *launch, "-m", "model.generate", *args]
    env = child_env({"CUDA_VISIBLE_DEVICES": ""})
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(v, None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)


def _body(stdout):
    """The prompt line and the generated text (the summary line's timings differ run to run)."""
    lines = stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("prompt ("), stdout
    return lines[:2], lines[2]


def test_torchrun_prints_the_single_process_tokens_from_rank_0():
    args = ["--preset", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "8"]
    one = _run(args)
    two = _run(args, nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    want, _ = _body(one.stdout)
    got, summary = _body(two.stdout)            # exactly one prompt line: rank 0 alone prints
    assert got == want
    assert len(want[1].split()) == 8
    assert "eager on CPU, 2 ranks (gloo), batch 1:" in summary
    assert two.stderr.count("the tiny preset has random weights") == 1      # rank 0's notes only


def test_torchrun_checkpoint_text_equals_the_single_process_text(tmp_path):
    from tests.text_checkpoint import REPLY, reply_chain, train_tokenizer, write_checkpoint

    tok = train_tokenizer()
    write_checkpoint(tmp_path, chain=reply_chain(tok, tok.encode("hi\n").ids[-1]), tokenizer=tok)
    args = ["--checkpoint", str(tmp_path), "--prompt", "hi\n", "--max-new-tokens", "16"]
    one, two = _run(args), _run(args, nproc=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr[-3000:])
    assert _body(two.stdout)[0] == _body(one.stdout)[0]
    assert REPLY in two.stdout and "stop: eos" in two.stdout


def test_torchrun_refuses_a_rank_count_that_does_not_divide():
    r = _run(["--preset", "tiny", "--prompt-ids", "1,2", "--max-new-tokens", "2"], nproc=3)
    assert r.returncode != 0
    want = "--nproc-per-node 3: 3 ranks cannot share the tiny model: num_attention_heads=4"
    assert want in r.stderr, r.stderr[-3000:]
    assert "prompt (" not in r.stdout


def test_torchrun_symm_mem_allreduce_on_the_cpu_is_refused_before_any_work():
    r = _run(["--preset", "tiny", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--allreduce", "symm_mem"], nproc=2)
    assert r.returncode != 0
    assert "--allreduce symm_mem needs NCCL on CUDA GPUs; on the CPU the ranks use gloo" in r.stderr, r.stderr[-3000:]
    assert "prompt (" not in r.stdout      # refused before the process group and the weights
