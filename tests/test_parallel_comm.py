"""The rank environment and the process group's start-up (model.parallel.env, comm), in one
process: torchrun's variables read or refused, the multicast switches set, a one-rank gloo group's
collectives and their argument checks."""
import os

import pytest
import torch

from model.parallel import Comm, LocalComm, init_distributed, torchrun_env
from model.parallel.env import MULTICAST_OFF, TORCHRUN_VARS
from tests.dist_launch import free_port


@pytest.fixture
def clean_env(monkeypatch):
    for v in TORCHRUN_VARS + tuple(MULTICAST_OFF):
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


def _set(mp, **kw):
    for k, v in kw.items():
        mp.setenv(k, str(v))


def test_torchrun_env_read_or_refused(clean_env):
    assert torchrun_env() is None
    _set(clean_env, MASTER_ADDR="10.0.0.1", MASTER_PORT=1, LOCAL_RANK=0)      # a cluster's, not a launch
    assert torchrun_env() is None
    _set(clean_env, RANK=1, WORLD_SIZE=2)
    assert torchrun_env() == {"RANK": 1, "WORLD_SIZE": 2, "LOCAL_RANK": 0}
    clean_env.delenv("MASTER_PORT")
    with pytest.raises(ValueError, match="not MASTER_PORT: start the ranks with torchrun"):
        torchrun_env()
    _set(clean_env, MASTER_PORT=1, RANK="x")
    with pytest.raises(ValueError, match="RANK='x' in the environment is not an integer"):
        torchrun_env()
    _set(clean_env, RANK=2)
    with pytest.raises(ValueError, match="need 0 <= RANK < WORLD_SIZE"):
        torchrun_env()


def test_init_distributed_needs_the_environment_and_a_timeout(clean_env):
    with pytest.raises(ValueError, match="needs torchrun's environment"):
        init_distributed()
    for bad in (0, -1.0, True, "60"):
        with pytest.raises(ValueError, match="timeout_s"):
            init_distributed(bad)
    with pytest.raises(RuntimeError, match="no process group"):
        Comm()


def test_one_rank_gloo_group(clean_env):
    import torch.distributed as dist

    _set(clean_env, RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    comm = init_distributed(timeout_s=30, backend="gloo")
    try:
        assert (comm.rank, comm.world, comm.backend) == (0, 1, "gloo")
        assert all(os.environ[k] == v for k, v in MULTICAST_OFF.items())
        t = torch.arange(4.0)
        comm.all_reduce_(t)
        assert torch.equal(t, torch.arange(4.0))
        out = torch.full((4,), float("nan"))
        comm.all_gather_into(out, t)
        assert torch.equal(out, t)
        with pytest.raises(ValueError, match="1 x 4 elements"):
            comm.all_gather_into(torch.empty(5), t)
        assert init_distributed(timeout_s=30).world == 1        # already started: the same group
        from model.parallel.symm_comm import SymmMemComm, make_comm

        assert make_comm("nccl", comm, max_batch=2, hidden_size=4, dtype=torch.float32) is comm
        with pytest.raises(ValueError, match="allreduce must be one of .* got 'mpi'"):
            make_comm("mpi", comm, max_batch=2, hidden_size=4, dtype=torch.float32)
        with pytest.raises(ValueError, match="allreduce='symm_mem' needs NCCL on CUDA GPUs .* this process group is gloo"):
            make_comm("symm_mem", comm, max_batch=2, hidden_size=4, dtype=torch.float32)
        with pytest.raises(ValueError, match="max_numel must be an int >= 1, got 0"):
            SymmMemComm(max_numel=0, dtype=torch.float32)
    finally:
        dist.destroy_process_group()
    local = LocalComm()
    out = torch.zeros(4)
    local.all_gather_into(out, t)
    assert torch.equal(out, t)
