"""Hardware facts for launch configurations: one DeviceProfile per device, built once from
cugraph_rt.device_attributes() (the device's properties), and the profiles of a few GPUs for
tests and for planning on a machine without them.

Every launch-configuration function in model/ops takes its numbers from a profile (the profile of
the device its tensors are on: ``profile_for(t)``), never from literals: how many programs fill
the GPU, whether PDL is available, how much shared memory a block may use.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch

from ..settings import SETTINGS

__all__ = ["DeviceProfile", "PRESETS", "INTERPRETER", "profile_for", "current_profile",
           "use_profile"]

MiB = 1 << 20
# device-to-device copy bandwidth (read + write, GB/s) where measured (DESIGN.md), by name
_MEASURED_COPY_GBS = (("H200", 4300.0), ("H100", 2970.0))


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    sm_count: int                    # streaming multiprocessors
    capability: tuple[int, int]      # compute capability (major, minor)
    smem_per_block: int              # shared memory one block may use, bytes (opt-in maximum)
    l2_bytes: int                    # L2 cache size, bytes
    copy_gbs: float | None = None    # measured device-to-device copy bandwidth, where measured
    interpreter: bool = False        # Triton's CPU interpreter: programs run one after another

    def __post_init__(self):
        for field in ("sm_count", "smem_per_block", "l2_bytes"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if field == "sm_count" else 0):
                raise ValueError(f"DeviceProfile {field} must be a non-negative int "
                                 f"(sm_count >= 1); got {v!r}")
        cap = self.capability
        if not (isinstance(cap, tuple) and len(cap) == 2 and all(isinstance(c, int) and c >= 0 for c in cap)):
            raise ValueError(f"DeviceProfile capability must be (major, minor) ints; got {cap!r}")

    @property
    def supports_pdl(self) -> bool:
        """Programmatic dependent launch (griddepcontrol): sm_90 and newer, not the interpreter."""
        return not self.interpreter and self.capability >= (9, 0)

    @property
    def fill_programs(self) -> int:
        """Programs that fill the GPU: two per SM (1 under the interpreter, where more programs
        only cost time)."""
        return 1 if self.interpreter else 2 * self.sm_count

    @property
    def stream_programs(self) -> int:
        """Programs a bandwidth-bound stream (a GEMV) wants: four per SM."""
        return 1 if self.interpreter else 4 * self.sm_count

    @classmethod
    def from_device(cls, device: int) -> "DeviceProfile":
        """The profile of CUDA device ``device``, from its properties."""
        import cugraph_rt
        a = cugraph_rt.device_attributes(device)
        smem, l2 = a["shared_memory_per_block_optin"], a["l2_cache_bytes"]
        if not smem or not l2:   # a cuda-bindings release without the fields: ask torch
            props = torch.cuda.get_device_properties(device)
            smem = smem or int(getattr(props, "shared_memory_per_block_optin", 0))
            l2 = l2 or int(getattr(props, "L2_cache_size", 0))
        copy = next((gbs for key, gbs in _MEASURED_COPY_GBS if key in a["name"]), None)
        return cls(a["name"], a["multiprocessors"], tuple(a["compute_capability"]), smem, l2, copy)

    @classmethod
    def preset(cls, name: str) -> "DeviceProfile":
        if name not in PRESETS:
            raise ValueError(f"unknown device preset {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS = {
    "a100": DeviceProfile("NVIDIA A100-SXM4-80GB", 108, (8, 0), 166912, 40 * MiB),
    "l4": DeviceProfile("NVIDIA L4", 58, (8, 9), 101376, 48 * MiB),
    "l40s": DeviceProfile("NVIDIA L40S", 142, (8, 9), 101376, 96 * MiB),
    "h100": DeviceProfile("NVIDIA H100 80GB HBM3", 132, (9, 0), 232448, 50 * MiB, copy_gbs=2970.0),
    "h200": DeviceProfile("NVIDIA H200", 132, (9, 0), 232448, 50 * MiB, copy_gbs=4300.0),
}
INTERPRETER = DeviceProfile("Triton interpreter (CPU)", 1, (0, 0), 1 << 30, 0, interpreter=True)

_lock = threading.Lock()
_by_device: dict[int, DeviceProfile] = {}
_override: list[DeviceProfile] = []


def _device_profile(index: int) -> DeviceProfile:
    profile = _by_device.get(index)
    if profile is None:
        with _lock:
            profile = _by_device.get(index)
            if profile is None:
                profile = _by_device[index] = DeviceProfile.from_device(index)
    return profile


def profile_for(t: torch.Tensor) -> DeviceProfile:
    """The profile launch configurations for tensor ``t`` use: the one set by use_profile(),
    else the interpreter's for CPU tensors or under TRITON_INTERPRET, else t's device's."""
    if _override:
        return _override[-1]
    dev = t.device
    if dev.type != "cuda" or SETTINGS.interpret:
        return INTERPRETER
    return _device_profile(dev.index if dev.index is not None else torch.cuda.current_device())


def current_profile() -> DeviceProfile:
    """profile_for() of the current CUDA device (for configurations computed from shapes alone)."""
    if _override:
        return _override[-1]
    if SETTINGS.interpret or not torch.cuda.is_available():
        return INTERPRETER
    return _device_profile(torch.cuda.current_device())


@contextlib.contextmanager
def use_profile(profile: DeviceProfile):
    """Launch configurations use ``profile`` whatever the tensors' device (tests, planning for a
    GPU that is not here). Not thread-safe: meant for one thread."""
    if not isinstance(profile, DeviceProfile):
        raise TypeError(f"profile must be a DeviceProfile; got {type(profile).__name__}")
    _override.append(profile)
    try:
        yield profile
    finally:
        _override.pop()
