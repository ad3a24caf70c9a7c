"""The decoder on int4 weights (QuantizedLinear fields): the ops dispatch by weight type, so the
Triton backend runs the int4 kernels and the reference backend their references. On the CPU the
kernels run under TRITON_INTERPRET=1; tokens go through decode_step (the int4 prefill has its own
tests: tests/test_prefill_int4.py). tests/gpu/test_decoder_int4_gpu.py runs 35b-a3b widths."""
import dataclasses

import pytest
import torch

from model.decoder import Decoder
from model.quant import QuantizedLinear, dequantize_weights, int4_fields, map_weights, quantize_weights
from model.quant.build import empty_int4_weights, random_int4_weights
from model.weights import empty_weights, random_weights

from tests.int4_helpers import small_int4_config, tiny32

STEPS = 64


def _greedy_both(cfg, w, steps, first=5):
    """Greedy decode through decode_step on both backends, each fed its own tokens; the logits of
    every step (poisoned before it) and the tokens."""
    decs = {b: Decoder(cfg, w, max_batch=1, max_seq=steps, backend=b) for b in ("reference", "triton")}
    logits = {b: [] for b in decs}
    tokens = {b: [first] for b in decs}
    for p in range(steps):
        for b, dec in decs.items():
            dec.logits.fill_(float("nan"))
            out = dec.decode_step(torch.tensor(tokens[b][-1:]), torch.tensor([p]))
            logits[b].append(out[0].clone())
            tokens[b].append(int(out[0].argmax()))
    return decs, logits, tokens


def test_int4_triton_matches_reference_greedy_64_steps():
    """fp32 activations: the kernels dequantize exactly as the references, so tokens agree over 64
    greedy steps, logits to fp32 summation order, and so do the final KV cache and GDN states."""
    cfg = small_int4_config()
    w = random_int4_weights(cfg, "cpu", torch.float32, seed=3, group_size=32, method="rtn")
    assert len(int4_fields(w)) == 6 * cfg.num_layers and not isinstance(w.lm_head, QuantizedLinear)
    decs, logits, tokens = _greedy_both(cfg, w, STEPS)
    assert tokens["triton"] == tokens["reference"]
    assert len(set(tokens["triton"])) > 8            # a walk through the vocabulary, not one token repeated
    for p, (a, b) in enumerate(zip(logits["triton"], logits["reference"])):
        assert torch.isfinite(a).all(), p
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {p}")
    ref, tri = decs["reference"].state, decs["triton"].state
    for name in ("kv", "conv", "recurrent"):
        torch.testing.assert_close(getattr(tri, name), getattr(ref, name), atol=1e-4, rtol=1e-4, msg=name)
    assert int(decs["triton"].kv_error_flag.item()) == 0


def test_reference_backend_on_int4_is_the_dequantized_model_exactly():
    """The reference ops dequantize and call the bf16 references: the int4 decoder's logits equal,
    bit for bit, the bf16 decoder's on dequantize_weights (lm_head int4 too)."""
    cfg = tiny32()
    w = random_int4_weights(cfg, "cpu", torch.float32, seed=4, group_size=32, method="hqq", lm_head="int4")
    assert isinstance(w.lm_head, QuantizedLinear)
    outs = []
    for weights in (w, dequantize_weights(w)):
        dec = Decoder(cfg, weights, max_batch=2, max_seq=8, backend="reference")
        out = []
        for p, tok in enumerate([[3, 9], [17, 2], [40, 41]]):
            out.append(dec.decode_step(torch.tensor(tok), torch.tensor([p, p])).clone())
        outs.append(torch.stack(out))
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


def test_int4_lm_head_and_tensor_core_path_bf16_batch_2():
    """bf16 rows at B = 2: the tensor-core int4 GEMV (the norm a kernel of its own before it) and an
    int4 lm_head, Triton against reference on the same teacher-forced tokens (the interpreter
    truncates to bf16 where the reference rounds: bf16 tolerances)."""
    cfg = small_int4_config()
    w = random_int4_weights(cfg, "cpu", torch.bfloat16, seed=5, group_size=32, method="rtn", lm_head="int4")
    assert isinstance(w.lm_head, QuantizedLinear)
    decs = {b: Decoder(cfg, w, max_batch=2, max_seq=4, backend=b) for b in ("reference", "triton")}
    for p, tok in enumerate([[3, 9], [17, 2], [40, 41]]):
        out = {}
        for b, dec in decs.items():
            dec.logits.fill_(float("nan"))
            out[b] = dec.decode_step(torch.tensor(tok), torch.tensor([p, p])).float().clone()
        assert torch.isfinite(out["triton"]).all(), p
        err = (out["triton"] - out["reference"]).abs().max() / out["reference"].abs().max()
        assert err < 0.03, (p, float(err))


# ---- what the decoder refuses -----------------------------------------------------------------
def _q_like(t, name):
    """A QuantizedLinear of t's shape (t's values quantized at group 32)."""
    from model.quant import quantize

    return quantize(t.float(), 32, "rtn", name=name)


@pytest.fixture(scope="module")
def int4_model():
    cfg = tiny32()
    return cfg, random_int4_weights(cfg, "cpu", torch.float32, seed=0, group_size=32, method="rtn")


def _with(w, name, value):
    return map_weights(w, lambda n, t: value if n == name else t)


def test_refuses_int4_in_a_plain_field(int4_model):
    cfg, w = int4_model
    Decoder(cfg, w, max_batch=1, max_seq=4, backend="reference")
    emb = _q_like(w.embed, "embed")             # [V, H=32] groups at 32, but the embedding is gathered
    with pytest.raises(TypeError, match=r"embed is a QuantizedLinear, but the decoder reads embed as a plain tensor"):
        Decoder(cfg, _with(w, "embed", emb), max_batch=1, max_seq=4, backend="reference")


def test_refuses_int4_of_the_wrong_shape(int4_model):
    cfg, w = int4_model
    t = w.layers[0].mixer.out_proj                   # [H=32, 64]: give it [64, 32] instead
    wrong = _q_like(torch.randn(t.shape[1], t.shape[0]), "x")
    with pytest.raises(ValueError, match=r"layers\.0\.mixer\.out_proj is a QuantizedLinear of shape \[64, 32\]; "
                                         r"the config's layers\.0\.mixer\.out_proj is \[32, 64\]"):
        Decoder(cfg, _with(w, "layers.0.mixer.out_proj", wrong), max_batch=1, max_seq=4, backend="triton")


def test_refuses_half_int4_experts_and_mixed_groups():
    from model.quant import quantize

    cfg = dataclasses.replace(tiny32(), hidden_size=64)      # gate_up's K = 64: group 64 fits there
    w = random_int4_weights(cfg, "cpu", torch.float32, seed=1, group_size=32, method="rtn")
    dn = w.layers[2].moe.down_proj.dequantize(torch.float32)
    with pytest.raises(TypeError, match=r"layers\.2\.moe: \['gate_up_proj', 'shared_down'\] are int4 but "
                                        r"\['down_proj'\] not"):
        Decoder(cfg, _with(w, "layers.2.moe.down_proj", dn), max_batch=1, max_seq=4, backend="reference")
    op = w.layers[0].mixer.in_proj.dequantize(torch.float32)  # a projection may have its own group size
    Decoder(cfg, _with(w, "layers.0.mixer.in_proj", quantize(op, 64, "rtn")), max_batch=1, max_seq=4)
    gu = quantize(w.layers[2].moe.gate_up_proj.dequantize(torch.float32), 64, "rtn")
    with pytest.raises(ValueError, match=r"layers\.2\.moe: the expert weights have group sizes "
                                         r"\{'gate_up_proj': 64, 'down_proj': 32, 'shared_down': 32\}"):
        Decoder(cfg, _with(w, "layers.2.moe.gate_up_proj", gu), max_batch=1, max_seq=4, backend="reference")


def test_refuses_a_plain_tensor_of_the_wrong_shape():
    cfg = tiny32()
    w = random_weights(cfg, "cpu", torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"layers\.3\.mixer\.q_norm has shape \[8\]; the config's "
                                         r"layers\.3\.mixer\.q_norm is \[16\]"):
        Decoder(cfg, _with(w, "layers.3.mixer.q_norm", torch.zeros(8)), max_batch=1, max_seq=4)


# ---- building int4 weights --------------------------------------------------------------------
def test_random_int4_weights_equal_quantizing_random_weights_and_chunk_as_whole():
    """Built tensor by tensor, quantized in row chunks of 512 weights (several chunks a tensor):
    the same codes, scales and zeros as quantizing random_weights whole; plain tensors equal."""
    cfg = tiny32()
    got = random_int4_weights(cfg, "cpu", torch.bfloat16, seed=7, group_size=32, method="hqq", lm_head="int4",
                              chunk_elems=512)
    want = quantize_weights(random_weights(cfg, "cpu", torch.bfloat16, seed=7), 32, "hqq", lm_head="int4")
    a, b = int4_fields(got), int4_fields(want)
    assert a.keys() == b.keys() and len(a) == 6 * cfg.num_layers + 1
    for n in a:
        for part in ("qweight", "scales", "zeros"):
            assert torch.equal(getattr(a[n], part), getattr(b[n], part)), (n, part)
    for (n, x), (_, y) in zip(got.tensors(), want.tensors()):
        if not isinstance(x, QuantizedLinear):
            assert torch.equal(x, y), n
    assert got.nbytes() == want.nbytes() < 0.45 * empty_weights(cfg, "meta", torch.bfloat16).nbytes()


def test_int4_builders_refuse_before_any_work():
    from model.config import ModelConfig

    with pytest.raises(ValueError, match=r"layers\.0\.moe\.down_proj: K=16"):
        random_int4_weights(ModelConfig.preset("tiny"), "cpu", torch.float32, 0, 32)
    tied = dataclasses.replace(tiny32(), tie_word_embeddings=True)
    with pytest.raises(ValueError, match="lm_head='int4' with tied embeddings"):
        empty_int4_weights(tied, "meta", torch.bfloat16, 32, lm_head="int4")
    with pytest.raises(ValueError, match="group_size=48 is not supported"):
        empty_int4_weights(tiny32(), "meta", torch.bfloat16, 48)


def test_int4_per_block_gemv_setting_matches_reference(monkeypatch):
    """MODEL_INT4_ROWS=0 (patched here: settings are read at import): every batch-1 int4 GEMV runs
    the per-block kernel (the whole-row kernel, the default, is made to refuse any launch), and the
    tokens and logits still agree with the reference backend over 16 greedy steps."""
    from model.ops.linear import int4
    from model.settings import SETTINGS

    class Refuse:
        def __getitem__(self, grid):
            raise AssertionError("the whole-row int4 GEMV kernel ran with MODEL_INT4_ROWS=0")

    monkeypatch.setattr(int4, "SETTINGS", dataclasses.replace(SETTINGS, int4_rows=False))
    monkeypatch.setattr(int4, "_gemv_int4_rows_kernel", Refuse())
    cfg = small_int4_config()
    w = random_int4_weights(cfg, "cpu", torch.float32, seed=5, group_size=32, method="rtn")
    decs, logits, tokens = _greedy_both(cfg, w, 16)
    assert tokens["triton"] == tokens["reference"] and len(set(tokens["triton"])) > 4
    for p, (a, b) in enumerate(zip(logits["triton"], logits["reference"])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {p}")


def test_int4_default_batch1_gemv_is_the_whole_row_kernel():
    """The default (MODEL_INT4_ROWS=1): batch-1 GEMVs with K <= 4096 get the whole-row kernel."""
    from model.ops.linear import int4
    assert int4.SETTINGS.int4_rows is True
    assert int4.gemv_int4_config(1, 2048, 4096, 128).programs > 0


def test_int4_whole_row_experts_setting_matches_reference(monkeypatch):
    """MODEL_INT4_MOE_ROWS=1 (patched: settings are read at import): the batch-1 experts run the
    whole-row kernels (counted), and tokens and logits agree with the reference backend over 16
    greedy steps."""
    from model.ops.moe import int4 as moe4
    from model.settings import SETTINGS

    from tests.launch_spy import CountLaunches

    spies = {p: CountLaunches(getattr(moe4, f"_moe_{p}_int4_rows_kernel")) for p in ("gate_up", "down")}
    monkeypatch.setattr(moe4, "SETTINGS", dataclasses.replace(SETTINGS, int4_moe_rows=True))
    for p, spy in spies.items():
        monkeypatch.setattr(moe4, f"_moe_{p}_int4_rows_kernel", spy)
    cfg = small_int4_config()
    w = random_int4_weights(cfg, "cpu", torch.float32, seed=6, group_size=32, method="rtn")
    decs, logits, tokens = _greedy_both(cfg, w, 16)
    assert spies["gate_up"].launches == spies["down"].launches == 16 * cfg.num_layers
    assert tokens["triton"] == tokens["reference"] and len(set(tokens["triton"])) > 4
    for p, (a, b) in enumerate(zip(logits["triton"], logits["reference"])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {p}")
