"""``python -m tests.fault_injection FAULT train.py-arguments...``: train.py, killed at the point FAULT names.

The process ends with ``os._exit(137)`` (what a SIGKILL leaves: no cleanup, no exception handler) at:

- ``step:N``: the end of training step N (mid-epoch, before any checkpoint of that step);
- ``write:N``: the N-th checkpoint write, after half of the file's bytes reached the disk (a kill during a copy
  onto a file system where the write is not atomic);
- ``before-last:N``: the N-th save of ``last.ckpt``, after the epoch / step file of the same state was written.
"""

import io
import os
import sys
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io import torch_io

from callbacks import RunCheckpoint
from refine_pl import RefineLitModule
from refine_pl.cli import cli_main
from refine_pl.console import exit_on_config_error

KILLED = 137


def _nth_call_kills(count: int, before: Any, kill: Any) -> Any:
    calls = 0

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == count:
            kill(*args, **kwargs)
            os._exit(KILLED)
        return before(*args, **kwargs)

    return wrapped


def _write_half(checkpoint: dict[str, Any], filepath: Any) -> None:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    Path(filepath).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def install(fault: str) -> None:
    """Arranges for the process to be killed at ``fault`` (see the module docstring)."""
    kind, count = fault.split(":")
    count = int(count)
    if kind == "step":
        original = RefineLitModule.on_train_batch_end

        def on_train_batch_end(self: RefineLitModule, *args: Any) -> None:
            original(self, *args)
            if self.trainer.global_step == count:
                os._exit(KILLED)

        RefineLitModule.on_train_batch_end = on_train_batch_end
    elif kind == "write":
        torch_io._atomic_save = _nth_call_kills(count, torch_io._atomic_save, _write_half)
    elif kind == "before-last":
        RunCheckpoint._save_last_checkpoint = _nth_call_kills(
            count, RunCheckpoint._save_last_checkpoint, lambda *args, **kwargs: None
        )
    else:
        raise ValueError(f"unknown fault {fault!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    exit_on_config_error(lambda: cli_main(sys.argv[2:]))
