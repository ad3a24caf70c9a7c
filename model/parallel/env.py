"""What a rank reads from its environment, without importing torch (model.generate asks before
parsing its arguments): torchrun's variables, and the NVLink-multicast switches it sets."""
from __future__ import annotations

import os

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# NVLink SHARP / multicast objects stay off: NCCL's NVLS algorithms, torch's symmetric memory and
# NVSHMEM would otherwise create multicast objects (cuMulticastCreate).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def set_multicast_off() -> None:
    """Set MULTICAST_OFF in os.environ (before any communicator exists; child processes inherit it)."""
    os.environ.update(MULTICAST_OFF)


def torchrun_env() -> dict | None:
    """{RANK, WORLD_SIZE, LOCAL_RANK} as ints where torchrun (or a launcher like it) set them, None
    where this process was not started as a rank. A partial or malformed set is a ValueError."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return None           # MASTER_ADDR or LOCAL_RANK alone may be a cluster's, not a launch's
    present = [v for v in TORCHRUN_VARS if v in os.environ]
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ValueError(f"the environment has {', '.join(present)} but not {', '.join(missing)}: start the "
                         f"ranks with torchrun (python -m torch.distributed.run --nproc-per-node N ...)")
    out = {}
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        try:
            out[v] = int(os.environ[v])
        except ValueError:
            raise ValueError(f"{v}={os.environ[v]!r} in the environment is not an integer") from None
    if not 0 <= out["RANK"] < out["WORLD_SIZE"] or out["LOCAL_RANK"] < 0:
        raise ValueError(f"RANK={out['RANK']}, WORLD_SIZE={out['WORLD_SIZE']}, LOCAL_RANK={out['LOCAL_RANK']}: "
                         f"need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    return out
