"""GraphHandle buckets with a per-call input that is not padded (`bucketed=`), on the GPU."""
import pytest
import torch

import cugraph_rt as cg

pytestmark = pytest.mark.gpu


def step(x, scale):
    # scale is a per-call [2] tensor (not padded): y = x * scale[0] + scale[1]
    return x * scale[0] + scale[1]


def test_unbucketed_scalar_input_reaches_every_bucket_and_replays_match_eager():
    ex = {"x": torch.zeros(64, 8, device="cuda"), "scale": torch.zeros(2, device="cuda")}
    with cg.GraphHandle(step, ex, warmup=1, buckets=(16, 64), bucketed={"x"}) as h:
        assert tuple(h.static_inputs(16)["scale"].shape) == (2,)
        assert tuple(h.static_inputs(16)["x"].shape) == (16, 8)
        for i, n in enumerate((5, 16, 40, 64, 3, 33)):
            x = torch.randn(n, 8, device="cuda")
            s = torch.tensor([1.5 + i, -0.25 * i], device="cuda")
            y = h(x=x, scale=s).clone()
            assert y.shape == (n, 8)
            torch.testing.assert_close(y, step(x, s), rtol=0, atol=0)
        assert h.phase == "replay" and h.stats.replays >= 4
        with pytest.raises(ValueError, match="'scale'"):
            h(x=torch.zeros(4, 8, device="cuda"), scale=torch.zeros(4, device="cuda"))
        with pytest.raises(ValueError, match=r"\['nope'\]"):
            cg.GraphHandle(step, ex, buckets=(16,), bucketed={"nope"})
