"""The shard plan and the shard builders, in one process (no process group): rank counts that do
not divide are refused naming the numbers; every rank's shard holds exactly the rows and columns
of its heads / experts / vocabulary (checked against transformers' tensors with an independent
formula); random shards equal the single-process weights cut; checkpoint shards equal the whole
checkpoint cut, reading only the rank's slices; at one rank the parallel decoder is the decoder."""
import dataclasses

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.decoder import Decoder
from model.parallel import (LocalComm, ParallelDecoder, ShardPlan, check_world, load_checkpoint_shard,
                            random_shard_weights, shard_weights)
import model.checkpoint as checkpoint_mod
from model.parallel.vocab import VocabShard, masked_embedding_reference
from model.weights import random_weights
from tests.checkpoint_files import per_expert, write_checkpoint

TINY = ModelConfig.preset("tiny")
# KV heads and GDN key heads split at 2 and 4 ranks, replicated at 8; tied embeddings
WIDE = dataclasses.replace(TINY, num_attention_heads=8, num_key_value_heads=4, linear_num_key_heads=4,
                           linear_num_value_heads=8, tie_word_embeddings=True, name="wide")


# ---- rank counts --------------------------------------------------------------------------------
@pytest.mark.parametrize("world,named", [
    (3, ["num_attention_heads=4", "num_experts=8", "vocab_size=256", "num_key_value_heads=2",
         "linear_num_key_heads=2"]),
    (8, ["num_attention_heads=4", "linear_num_value_heads=4"]),
])
def test_rank_counts_that_do_not_divide_are_refused(world, named):
    with pytest.raises(ValueError, match=f"{world} ranks cannot share the tiny model") as e:
        check_world(TINY, world)
    for n in named:
        assert n in str(e.value)
    with pytest.raises(ValueError, match="num_key_value_heads=3 is neither a multiple nor a divisor of 2"):
        ShardPlan(dataclasses.replace(TINY, num_attention_heads=6, num_key_value_heads=3), 0, 2)
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=24 is not a multiple of 16"):
        check_world(dataclasses.replace(TINY, num_attention_heads=16, linear_num_value_heads=16,
                                        num_experts=16), 16)


def test_the_presets_divide_over_1_2_4_8_and_plans_are_checked():
    for name in ("35b-a3b", "122b-a10b"):
        for n in (1, 2, 4, 8):
            check_world(ModelConfig.preset(name), n)
    for bad in (0, -2, 2.0, True, "2"):
        with pytest.raises(ValueError, match="number of ranks"):
            check_world(TINY, bad)
    for rank in (-1, 2, 1.0):
        with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"):
            ShardPlan(TINY, rank, 2)
    with pytest.raises(TypeError, match="ModelConfig"):
        ShardPlan({"vocab_size": 256}, 0, 1)


# ---- what each rank holds -----------------------------------------------------------------------
def _numbered(cfg):
    """Whole weights whose every element is distinct (its index), to see which ones a shard holds."""
    w = random_weights(cfg, "cpu", torch.float64, seed=0)
    n = 0
    for _, t in w.tensors():
        t.copy_(torch.arange(n, n + t.numel(), dtype=torch.float64).view(t.shape))
        n += t.numel()
    return w


def _expected_rows(cfg, r, n):
    """transformers' name -> (dim, indices) of the whole tensor that rank r of n must hold, from the
    model's head structure alone (value head j reads key head j // (NV/NK), query head h reads KV
    head h // (NH/NKV))."""
    D, K, V = cfg.head_dim, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    NH, NKV = cfg.num_attention_heads, cfg.num_key_value_heads
    NK, NV = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    E, Is, Vocab = cfg.num_experts, cfg.shared_expert_intermediate_size, cfg.vocab_size

    def block(heads, width):
        return [h * width + i for h in heads for i in range(width)]

    q = range(r * NH // n, (r + 1) * NH // n)
    kv = sorted({h // (NH // NKV) for h in q})
    vh = range(r * NV // n, (r + 1) * NV // n)
    kh = sorted({j // (NV // NK) for j in vh})
    qkv = block(kh, K) + [NK * K + i for i in block(kh, K)] + [2 * NK * K + i for i in block(vh, V)]
    s = list(range(r * Is // n, (r + 1) * Is // n))
    return {
        "self_attn.q_proj.weight": (0, block(q, 2 * D)), "self_attn.k_proj.weight": (0, block(kv, D)),
        "self_attn.v_proj.weight": (0, block(kv, D)), "self_attn.o_proj.weight": (1, block(q, D)),
        "linear_attn.in_proj_qkv.weight": (0, qkv), "linear_attn.conv1d.weight": (0, qkv),
        "linear_attn.in_proj_z.weight": (0, block(vh, V)), "linear_attn.in_proj_b.weight": (0, list(vh)),
        "linear_attn.in_proj_a.weight": (0, list(vh)), "linear_attn.A_log": (0, list(vh)),
        "linear_attn.dt_bias": (0, list(vh)), "linear_attn.out_proj.weight": (1, block(vh, V)),
        "mlp.shared_expert.gate_proj.weight": (0, s), "mlp.shared_expert.up_proj.weight": (0, s),
        "mlp.shared_expert.down_proj.weight": (1, s),
        "mlp.experts.gate_up_proj": (0, list(range(r * E // n, (r + 1) * E // n))),
        "mlp.experts.down_proj": (0, list(range(r * E // n, (r + 1) * E // n))),
        "embed_tokens.weight": (0, list(range(r * Vocab // n, (r + 1) * Vocab // n))),
        "lm_head.weight": (0, list(range(r * Vocab // n, (r + 1) * Vocab // n))),
    }


@pytest.mark.parametrize("cfg,world", [(TINY, 1), (TINY, 2), (TINY, 4), (WIDE, 2), (WIDE, 4), (WIDE, 8)],
                         ids=["tiny-1", "tiny-2", "tiny-4", "wide-2", "wide-4", "wide-8"])
def test_each_shard_holds_exactly_its_heads_experts_and_vocabulary(cfg, world):
    whole = _numbered(cfg)
    hf_whole = whole.to_hf_state_dict()
    for r in range(world):
        plan = ShardPlan(cfg, r, world)
        shard = shard_weights(whole, plan)
        local = plan.local
        assert local.num_attention_heads == cfg.num_attention_heads // world
        assert local.num_key_value_heads == max(1, cfg.num_key_value_heads // world)
        assert (local.vocab_size, local.num_experts) == (cfg.vocab_size, cfg.num_experts)
        want = _expected_rows(cfg, r, world)
        for name, t in shard.to_hf_state_dict().items():
            key = name.split(".", 3)[-1] if ".layers." in name else name.split(".", 1)[-1] \
                if name.startswith("model.") else name
            src = hf_whole[name]
            if key in want:
                dim, idx = want[key]
                src = src.index_select(dim, torch.tensor(idx))
            assert torch.equal(t, src), f"rank {r} of {world}: {name}"


@pytest.mark.parametrize("cfg", [TINY, WIDE], ids=["tiny", "wide"])
def test_random_shards_equal_the_single_process_weights_cut(cfg):
    whole = random_weights(cfg, "cpu", torch.float32, seed=4)
    for world in (1, 2, 4) if cfg is TINY else (2, 8):
        for r in range(world):
            plan = ShardPlan(cfg, r, world)
            got, want = dict(random_shard_weights(plan, "cpu", torch.float32, 4).tensors()), \
                dict(shard_weights(whole, plan).tensors())
            assert got.keys() == want.keys()
            for k in want:
                assert torch.equal(got[k], want[k]), (world, r, k)
            assert got["embed"].shape[0] == cfg.vocab_size // world


# ---- checkpoints ---------------------------------------------------------------------------------
def _save(path, sd, config, shards=1, prefix="model."):
    """write_checkpoint with the names under `prefix`."""
    sd = {(k if k.startswith("lm_head") else prefix + k[len("model."):]): v for k, v in sd.items()}
    write_checkpoint(path, sd, config, shards)


@pytest.fixture(scope="module", params=["per_expert_sharded", "fused_multimodal", "tied"])
def checkpoint(request, tmp_path_factory):
    cfg = WIDE if request.param == "tied" else TINY
    w = random_weights(cfg, "cpu", torch.float32, seed=6)
    sd = w.to_hf_state_dict()
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "per_expert_sharded":
        _save(path, per_expert(sd, cfg), cfg.to_hf_dict(), shards=3)
    elif request.param == "fused_multimodal":
        _save(path, sd, {"model_type": "qwen3_5_moe", "text_config": cfg.to_hf_dict(), "vision_config": {}},
              prefix="model.language_model.")
    else:
        sd.pop("lm_head.weight")
        _save(path, sd, cfg.to_hf_dict())
    return cfg, path


class _Recorder:
    """safe_open handles that count the elements each read returns; whole-tensor reads refused."""

    def __init__(self, monkeypatch):
        self.read, self.names = 0, set()
        real = checkpoint_mod._open
        rec = self

        class Slice:
            def __init__(self, sl, name):
                self.sl, self.name = sl, name

            def __getattr__(self, a):
                return getattr(self.sl, a)

            def __getitem__(self, idx):
                t = self.sl[idx]
                rec.read += t.numel()
                rec.names.add(self.name)
                return t

        class Handle:
            def __init__(self, h):
                self.h = h

            def get_slice(self, name):
                return Slice(self.h.get_slice(name), name)

            def get_tensor(self, name):
                raise AssertionError(f"the shard loader read all of {name}")

            def keys(self):
                return self.h.keys()

            def __enter__(self):      # checkpoint.py lists a file's tensor names in a with block
                return self

            def __exit__(self, *exc):
                return False

        monkeypatch.setattr(checkpoint_mod, "_open", lambda path: Handle(real(path)))   # the files both loaders open


def test_checkpoint_shards_equal_the_whole_checkpoint_cut_reading_only_their_slices(checkpoint, monkeypatch):
    cfg, path = checkpoint
    _, whole = load_checkpoint(path, device="cpu", verbose=False)
    for world in (1, 2, 4):
        for r in range(world):
            plan = ShardPlan(cfg, r, world)
            rec = _Recorder(monkeypatch)
            got = load_checkpoint_shard(path, plan, "cpu", verbose=False)
            want = shard_weights(whole, plan)
            for (n, a), (m, b) in zip(got.tensors(), want.tensors()):
                assert n == m and torch.equal(a, b), (world, r, n)
            assert rec.read == got.nbytes() // 4, (world, r)      # every element of the shard read once
            mine = plan.experts
            other = [n for n in rec.names if ".experts." in n and n.split(".experts.")[1].split(".")[0].isdigit()
                     and int(n.split(".experts.")[1].split(".")[0]) not in mine]
            assert not other, other[:3]


def test_checkpoint_of_another_model_or_int4_is_refused(checkpoint, tmp_path):
    cfg, path = checkpoint
    other = dataclasses.replace(cfg, num_layers=2)
    with pytest.raises(ValueError, match="different model"):
        load_checkpoint_shard(path, ShardPlan(other, 0, 2), "cpu")
    with pytest.raises(TypeError, match="ShardPlan"):
        load_checkpoint_shard(path, cfg, "cpu")


# ---- the decoder ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_one_rank_is_the_single_process_decoder_bit_for_bit(backend):
    w = random_weights(TINY, "cpu", torch.float32, seed=1)
    plan = ShardPlan(TINY, 0, 1)
    ref = Decoder(TINY, w, max_batch=2, max_seq=16, backend=backend)
    par = ParallelDecoder(plan, shard_weights(w, plan), LocalComm(), max_batch=2, max_seq=16, backend=backend)
    pos = torch.tensor([5, 2])
    if backend == "reference":      # the prefill too (the Triton one is slow under the interpreter)
        for d in (ref, par):
            d.prefill_step(4)
            d.logits.fill_(float("nan"))
        a, b = ref.prefill([[3, 1, 4, 1, 5], [9, 2]]).clone(), par.prefill([[3, 1, 4, 1, 5], [9, 2]]).clone()
        assert torch.equal(a, b) and torch.isfinite(a).all()
    else:
        pos = torch.tensor([0, 0])
    for step in range(2):
        for d in (ref, par):
            d.logits.fill_(float("nan"))
        tok = torch.tensor([7 + step, 8])
        a, b = ref.decode_step(tok, pos + step).clone(), par.decode_step(tok, pos + step).clone()
        assert torch.equal(a, b) and torch.isfinite(a).all()


def test_parallel_decoder_checks_its_shard_and_comm():
    w = random_weights(TINY, "cpu", torch.float32, seed=1)
    plan = ShardPlan(TINY, 0, 2)
    with pytest.raises(ValueError, match="rank 0 of 1, the shard plan rank 0 of 2"):
        ParallelDecoder(plan, shard_weights(w, plan), LocalComm(), max_batch=1, max_seq=8, backend="reference")

    class TwoRanks(LocalComm):
        world = 2

    with pytest.raises(ValueError, match=r"embed has shape \[256, 32\]; rank 0 of 2 holds \[128, 32\]"):
        ParallelDecoder(plan, dataclasses.replace(w, cfg=plan.local), TwoRanks(), max_batch=1, max_seq=8,
                        backend="reference")
    with pytest.raises(ValueError, match="not built for rank 0 of 2"):
        ParallelDecoder(plan, w, TwoRanks(), max_batch=1, max_seq=8, backend="reference")
    with pytest.raises(TypeError, match="Comm or LocalComm"):
        ParallelDecoder(plan, shard_weights(w, plan), object(), max_batch=1, max_seq=8, backend="reference")


# ---- the vocabulary split ------------------------------------------------------------------------
class _Rank(LocalComm):
    """Rank r of n without a process group: the all-reduce is left to the test (it sums the ranks'
    outputs), the all-gather takes the other ranks' slices from `others`."""

    def __init__(self, r, n, others=None):
        self.rank, self.world, self.others = r, n, others

    def all_gather_into(self, out, t):
        out.view(-1).copy_(torch.cat([t.reshape(-1) if i == self.rank else self.others[i].reshape(-1)
                                      for i in range(self.world)]))


@pytest.mark.parametrize("n", [2, 4])
def test_vocab_shards_embed_and_gather_the_whole_vocabulary(n):
    g = torch.Generator().manual_seed(n)
    V, H = 64, 8
    table, head = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    tokens = torch.tensor([0, 17, 63, 32, 31, 5])
    rows = [range(r * V // n, (r + 1) * V // n) for r in range(n)]
    parts = []
    for r in range(n):
        vs = VocabShard(_Rank(r, n), rows[r], len(tokens), 3, torch.float32, "cpu")
        out = torch.full((len(tokens), H), float("nan"))
        vs.embed(table[rows[r].start:rows[r].stop], tokens, out)
        assert torch.equal(out, masked_embedding_reference(table[rows[r].start:rows[r].stop], tokens, rows[r].start))
        parts.append(out)
    assert torch.equal(sum(parts), table[tokens])       # one non-zero term per row
    x = torch.randn(3, H, generator=g)
    for b in (1, 3):
        slices = [x[:b] @ head[rs.start:rs.stop].t() for rs in rows]     # what the other ranks computed
        for r in range(n):
            vs = VocabShard(_Rank(r, n, slices), rows[r], 1, 3, torch.float32, "cpu")
            logits = torch.full((b, V), float("nan"))
            vs.logits(lambda xx, w, o: torch.mm(xx, w.t(), out=o), x[:b], head[rows[r].start:rows[r].stop], logits)
            torch.testing.assert_close(logits, x[:b] @ head.t())
