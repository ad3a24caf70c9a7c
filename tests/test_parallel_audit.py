"""tools/parallel_audit.py: the parallel steps' launches at each rank count's local shapes break no
launch rule on an H200 or an A100 profile, and the router runs its expert-parallel form."""
import pytest

from model.ops.hardware import PRESETS
from tools.launch_audit import problems, unique
from tools.parallel_audit import main, record_parallel


@pytest.mark.parametrize("profile", ["h200", "a100"])
def test_parallel_launches_are_valid_at_every_rank_count(profile):
    log = record_parallel(PRESETS[profile], "35b-a3b", (2, 4, 8), batches=(1, 8), chunks=(16,))
    launches = unique(log)
    bad = {L.kernel: problems(L, PRESETS[profile]) for L in launches if problems(L, PRESETS[profile])}
    assert not bad, bad
    routers = [L for L in log if L.kernel == "_router_topk_kernel"]
    assert routers and all(L.constexprs["LOCAL"] for L in routers)
    # the lm_head GEMV covers each rank's vocabulary slice: 248320 / N rows
    assert {L.args["N"] for L in log if L.kernel == "_gemv_kernel" and L.args.get("N", 0) > 20000} == \
        {248320 // n for n in (2, 4, 8)}


def test_rank_counts_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--world", "3"])
    assert "--world 3: 3 ranks cannot share the tiny model" in capsys.readouterr().err
