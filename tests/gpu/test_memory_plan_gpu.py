"""model.memory_plan on a GPU: the plan matches what torch's allocator hands out for a Triton
decoder, free memory is cudaMemGetInfo's, and a preset larger than the GPU is refused up front."""
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_plan_matches_device_allocation_of_a_triton_decoder():
    from model import memory_plan as mp
    from model.config import ModelConfig
    from model.decoder import Decoder
    from model.generation import Generator
    from model.weights import random_weights

    cfg = ModelConfig.preset("tiny")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    w = random_weights(cfg, "cuda", torch.bfloat16, seed=0)
    dec = Decoder(cfg, w, max_batch=4, max_seq=300, backend="triton")
    gen = Generator(dec, use_graph=False)
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated() - before
    planned = sum(mp.decode_memory(cfg, batch=4, max_seq=300, dtype_bytes=2, backend="triton").values())
    n_tensors = len(list(w.tensors())) + 40          # the allocator rounds each block up to 512 bytes
    assert planned <= used <= planned + n_tensors * 512, (planned, used)
    del gen, dec, w


def test_free_memory_is_cudamemgetinfo():
    from model import memory_plan as mp

    free, label = mp.free_memory("cuda")
    ref, total = torch.cuda.mem_get_info()
    assert abs(free - ref) <= 64 << 20 and 0 < free <= total
    assert label.startswith("GPU 0 memory (") and torch.cuda.get_device_name(0) in label


def test_generate_refuses_a_preset_larger_than_the_gpu():
    total = torch.cuda.mem_get_info()[1]
    assert total < 400 * 10 ** 9, "this test needs a GPU too small for 122b-a10b in bf16 (every GPU today)"
    r = subprocess.run([sys.executable, "-m", "model.generate", "--preset", "122b-a10b"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "not enough memory: the 122b-a10b preset (batch 1, 36 positions) needs 227." in r.stderr
    assert "of GPU 0 memory (" in r.stderr and "try --layers " in r.stderr
    assert "Traceback" not in r.stderr
