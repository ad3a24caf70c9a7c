"""The device loop's parts that run without a GPU: advance_rows (Triton under the interpreter
against its reference), the host's ring reader against the device's stop rule, per-row budgets,
and the arguments. The loop itself (graphs, conditional nodes, mapped memory) is tested in
tests/gpu/test_device_loop_gpu.py."""
import numpy as np
import pytest
import torch

from model.device_loop import UNWRITTEN, _RingReader, check_fixed_steps, check_mode
from model.generation import Generator
from model.ops.loop_rows import EOS_SLOTS, advance_rows_reference, advance_rows_triton, ctl_numel
from test_generation import _decoder, tiny  # noqa: F401 - the fixture


def _ctl(positions, active, count, budget, eos, step=0):
    B = len(positions)
    ctl = torch.zeros(ctl_numel(B), dtype=torch.int64)
    ctl[:B] = torch.tensor(positions)
    ctl[B:2 * B] = torch.tensor(active)
    ctl[2 * B:3 * B] = torch.tensor(count)
    ctl[3 * B:4 * B] = torch.tensor(budget)
    ctl[4 * B:4 * B + EOS_SLOTS] = -1
    ctl[4 * B:4 * B + len(eos)] = torch.tensor(eos, dtype=torch.int64)
    ctl[4 * B + EOS_SLOTS] = step
    return ctl


CASES = [
    # tokens, active, count, budget, eos, step
    ([7, 3, 9], [1, 1, 1], [0, 0, 0], [5, 1, 5], [9], 0),        # row 1 at its budget, row 2 at eos
    ([7, 3, 9], [1, 0, 1], [2, 4, 1], [5, 5, 5], [], 3),         # row 1 stopped before: -1 in the ring
    ([2, 2], [0, 0], [3, 3], [5, 5], [2], 4),                    # nobody active: only the flag (0)
    ([11], [1], [3], [100], [11, 12], 5),                        # batch 1, second eos id
]


@pytest.mark.parametrize("fn", [advance_rows_reference, advance_rows_triton], ids=["reference", "triton"])
@pytest.mark.parametrize("case", CASES)
def test_advance_rows(fn, case):
    toks, active, count, budget, eos, step = case
    B = len(toks)
    tokens = torch.tensor(toks, dtype=torch.int64)
    ctl = _ctl([10 + r for r in range(B)], active, count, budget, eos, step)
    before = ctl.clone()
    ring = torch.full((8, B), UNWRITTEN, dtype=torch.int32)
    flag = torch.full((1,), -5, dtype=torch.int32)
    fn(tokens, ctl, ring, flag)
    was = [a != 0 for a in active]
    if not any(was):
        assert flag.item() == 0 and torch.equal(ctl, before) and (ring == UNWRITTEN).all()
        return
    cnt = [c + int(w) for c, w in zip(count, was)]
    still = [w and t not in eos and c < b for w, t, c, b in zip(was, toks, cnt, budget)]
    assert ring[step].tolist() == [t if w else -1 for t, w in zip(toks, was)]
    assert (ring[:step] == UNWRITTEN).all() and (ring[step + 1:] == UNWRITTEN).all()
    assert ctl[:B].tolist() == [11 + r for r in range(B)]            # every row advanced
    assert ctl[B:2 * B].tolist() == [int(s) for s in still]
    assert ctl[2 * B:3 * B].tolist() == cnt
    assert ctl[3 * B:].tolist() == before[3 * B:].tolist()[:-1] + [step + 1]
    assert flag.item() == int(any(still))


def _simulate(seqs, budgets, eos, fn):
    """Run advance_rows over per-row token streams as the loop would (init, then while flag), and
    read the ring with the host's reader: returns (rows read, tokens by row, steps run)."""
    B = len(seqs)
    ctl = _ctl([0] * B, [1] * B, [0] * B, budgets, eos)
    ring = torch.full((64, B), UNWRITTEN, dtype=torch.int32)
    flag = torch.zeros(1, dtype=torch.int32)
    got = [[] for _ in range(B)]
    reader = _RingReader(ring.numpy(), B, budgets, eos,
                         lambda i, toks: [got[r].append(t) for r, t in enumerate(toks) if t >= 0])
    step = 0
    tokens = torch.tensor([s[0] for s in seqs], dtype=torch.int64)
    fn(tokens, ctl, ring, flag)
    while flag.item():
        step += 1
        tokens = torch.tensor([s[step] for s in seqs], dtype=torch.int64)
        fn(tokens, ctl, ring, flag)
    fn(tokens, ctl, ring, flag)          # a fixed-K graph's step after everybody stopped
    reader._take()
    return reader, got, step


@pytest.mark.parametrize("fn", [advance_rows_reference, advance_rows_triton], ids=["reference", "triton"])
def test_ring_reader_mirrors_the_device_stop_rule(fn):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 6, 40).tolist() for _ in range(3)]
    budgets, eos = [30, 2, 12], [5]
    reader, got, steps = _simulate(seqs, budgets, eos, fn)
    want = []
    for s, b in zip(seqs, budgets):     # the per-step generator's rule, written out
        out = []
        for t in s:
            out.append(t)
            if t in eos or len(out) >= b:
                break
        want.append(out)
    assert got == want and reader.done
    assert reader.rows == max(len(w) for w in want) == steps + 1


def test_ring_reader_refuses_a_device_that_disagrees():
    ring = np.full((4, 2), UNWRITTEN, dtype=np.int32)
    ring[0] = [4, -1]            # row 1 stopped on the device, but the host has it active
    reader = _RingReader(ring, 2, [3, 3], [], lambda i, t: None)
    with pytest.raises(RuntimeError, match="row 1: token -1 but the host has the row active"):
        reader._take()


def test_ring_reader_waits_for_a_whole_row():
    ring = np.full((4, 2), UNWRITTEN, dtype=np.int32)
    seen = []
    reader = _RingReader(ring, 2, [3, 3], [], lambda i, t: seen.append(t))
    ring[0, 0] = 4               # half a row: not read yet
    assert reader._take() == 0 and seen == []
    ring[0, 1] = 6
    assert reader._take() == 1 and seen == [[4, 6]]


def test_modes_and_fixed_steps_are_checked():
    assert check_mode(True) == "while" and check_mode(False) is None and check_mode("fixed") == "fixed"
    with pytest.raises(ValueError, match="device_loop must be .* got 'loop'"):
        check_mode("loop")
    assert check_fixed_steps([16, 4]) == (1, 4, 16)
    for bad in ([0], [2.5], [True], "x", 5):
        with pytest.raises(ValueError, match="fixed_steps"):
            check_fixed_steps(bad)


def test_device_loop_needs_graphs_and_says_so(tiny):  # noqa: F811
    with pytest.raises(ValueError, match="use_graph=True"):
        Generator(_decoder(tiny), use_graph=False, device_loop=True)
    gen = Generator(_decoder(tiny), use_graph=False)
    with pytest.raises(ValueError, match="use_graph=True"):
        gen.generate([[1, 2]], 3, device_loop="while")
    with pytest.raises(ValueError, match=r"device_loop=.fixed. .* \(start_positions\)"):
        gen.generate([[1, 2]], 3, device_loop="fixed", start_positions=[0])
    with pytest.raises(ValueError, match="17 end-of-sequence ids; the device loop takes at most 16"):
        gen.generate([[1, 2]], 3, device_loop="while", eos_token_ids=range(17))
    assert gen.generate([[1, 2]], 3).tokens[0]         # still usable


def test_per_row_budgets(tiny):  # noqa: F811
    gen = Generator(_decoder(tiny, batch=2), use_graph=False)
    res = gen.generate([[1, 2], [3]], [2, 5])
    assert [len(t) for t in res.tokens] == [2, 5] and res.stop_reasons == ["length", "length"]
    both = gen.generate([[1, 2], [3]], 5)
    assert res.tokens[0] == both.tokens[0][:2] and res.tokens[1] == both.tokens[1]
    with pytest.raises(ValueError, match="2 budgets for 1 prompts|1 budgets for 2 prompts"):
        gen.generate([[1, 2], [3]], [4])
    with pytest.raises(ValueError, match="positive int, got 0 for prompt 1"):
        gen.generate([[1, 2], [3]], [4, 0])
