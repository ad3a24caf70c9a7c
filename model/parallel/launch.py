"""Running a program as one rank of a torchrun job: rank 0 prints, and a failure on any rank
ends the job with its error instead of a hang.

- quiet_other_ranks(rank): on ranks other than 0, stdout and stderr go to /dev/null (rank 0's
  output is the program's output); errors still reach the real stderr (below).
- run_rank(fn): runs fn(); an exception, or an exit with a non-zero status, prints
  "rank R of N: ..." with the traceback to the real stderr, records it for torchrun's summary, and
  ends the process at once with a non-zero status (os._exit: no interpreter teardown, which could
  wait on a peer that is stuck in a collective). torchrun then stops the other ranks; ranks
  started another way see their next collective fail when the peer's connection drops (gloo) or
  at the process group's timeout (init_distributed's timeout_s).
"""
from __future__ import annotations

import os
import sys
import traceback


def _where() -> str:
    return f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')}"


def quiet_other_ranks(rank: int) -> None:
    if rank != 0:
        devnull = open(os.devnull, "w")     # noqa: SIM115 - kept open for the process's life
        sys.stdout = sys.stderr = devnull


def _record(exc: BaseException) -> None:
    """Write the error where torchrun collects it (TORCHELASTIC_ERROR_FILE), for its summary."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
    except Exception:  # noqa: BLE001 - the summary is a courtesy; the exit status is what counts
        pass


def _die(status: int, message: str, exc: BaseException | None) -> None:
    err = sys.__stderr__
    try:
        err.write(f"{_where()}: {message}\n")
        if exc is not None:
            err.write("".join(traceback.format_exception(exc)))
            _record(exc)
        err.flush()
        sys.__stdout__.flush()
    finally:
        os._exit(status)


def run_rank(fn) -> int:
    """fn()'s status (int or None -> 0) after a clean end; see the module doc for failures."""
    try:
        status = fn()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code:
            msg = e.code if isinstance(e.code, str) else f"exited with status {code}"
            _die(code, str(msg), None)
        status = 0
    except KeyboardInterrupt:
        _die(130, "interrupted", None)
    except BaseException as e:  # noqa: BLE001 - every failure ends this rank at once
        _die(1, f"failed: {type(e).__name__}: {e}", e)
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - tearing down after a successful run must not fail it
        pass
    return int(status or 0)
