"""What refine-pl relies on in Lightning, jsonargparse and torch beyond their documented APIs, in one place.

Each item below names the behaviour it depends on; ``tests/test_internals.py`` checks every one of them, so
a new release that changes one fails there first, by name, rather than somewhere deep in a training run.
One more lives where it must, as an override: ``RefineCLI._parse_ckpt_path`` (``refine_pl/cli.py``) turns off
LightningCLI's merging of a checkpoint's hyper-parameters into the config.
"""

import io
import os
import re
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler, Sampler

from refine_pl.errors import ConfigError


def batches_done_in_epoch(trainer: "pl.Trainer") -> int:
    """Batches of the current epoch that the training loop counts as trained.

    After a resume this is the loop's restored position; a resumable loader starts its data there.
    """
    return trainer.fit_loop.epoch_loop.batch_progress.current.ready


def global_seed() -> int:
    """The seed of the run's ``seed_everything``, as Lightning's own samplers read it (0 when none was set).

    ``seed_everything`` exports it as ``PL_GLOBAL_SEED``, and Lightning passes it on to the processes it starts.
    """
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class KeptDistributedSampler(DistributedSampler):
    """Base class of a training sampler that Lightning uses as it is in a multi-process run.

    Lightning replaces the sampler of every training DataLoader by its own ``DistributedSampler`` when the run
    is distributed, unless the sampler already is a ``DistributedSampler``; it then calls its ``set_epoch``
    every epoch.
    """


def unrepeated_sampler(dataset: Dataset, world_size: int, rank: int) -> Sampler:
    """Process ``rank``'s share of ``dataset`` in order, without padding, so that every sample is evaluated once.

    Lightning's ``UnrepeatedDistributedSampler`` (``pytorch_lightning.overrides``), which it uses for prediction.
    """
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)


def config_error_cause(error: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` that ``error`` was raised from, if any.

    jsonargparse wraps an exception raised by a constructor of the config in a ``ValueError`` about the
    config's types, and keeps the original as the ``__cause__`` of that error (possibly a few levels down).
    """
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ConfigError):
        cause = cause.__cause__
    return cause


class ParseFailure(NamedTuple):
    """Where and why jsonargparse refused a command line: the config keys down to the value, and the reason."""

    keys: list[str]
    reason: str
    syntax: bool


def parse_failure(error: BaseException) -> ParseFailure:
    """What a jsonargparse parse error (``exit_on_error=False``) says, without its usage and union listings.

    jsonargparse raises its ``ArgumentError`` from a chain of errors (``__cause__``), one per nesting level: a
    level's message starts with ``Parser key "KEY"`` (KEY is dotted, ``trainer.max_epochs``) where a value of a
    key is refused, a class's nested options each start a new level, and the last error holds the reason itself
    (``Option 'X' is not accepted`` for an unknown option X, which is then one more key; a YAML parser's error
    for a config that is not valid YAML).
    """
    keys: list[str] = []
    deepest: BaseException = error
    cause: BaseException | None = error
    while cause is not None:
        found = re.match(r'Parser key "([^"]+)"', str(cause))
        if found and (not keys or keys[-1] != found[1]):
            keys.append(found[1])
        deepest, cause = cause, cause.__cause__
    reason = str(deepest).strip().splitlines()[0] if str(deepest).strip() else type(deepest).__name__
    unknown = re.match(r"Option '([^']+)' is not accepted", reason)
    if unknown:
        keys.append(unknown[1])
        reason = "no such option"
    syntax = type(deepest).__module__.startswith("yaml")
    return ParseFailure(keys, re.sub(r"<class '([\w.]+)'>", r"\1", reason), syntax)


def message_without_worker_traceback(message: str) -> str:
    """The message of an error re-raised by a DataLoader worker, without the worker's traceback.

    torch re-raises an error of a worker process in the main process as the same type, built from a text that
    holds ``Caught <type> in DataLoader worker process N.``, ``Original Traceback (most recent call last):``,
    the worker's traceback and, last, ``<module>.<type>: <message>``.
    """
    marker = f"{ConfigError.__module__}.{ConfigError.__qualname__}: "
    if "Original Traceback" in message and marker in message:
        return message.rsplit(marker, 1)[1].strip()
    return message


def archive_records(data: bytes) -> dict[str, int] | None:
    """The records of a torch zip archive (name without the archive's root folder: size), None when unreadable.

    Read with ``torch._C.PyTorchFileReader``, the reader torch.load, torch.jit.load and torch.export.load open
    archives with, so the names are the ones those loaders will see (a second zip parser could see others).
    """
    try:
        reader = torch._C.PyTorchFileReader(io.BytesIO(data))
        return {name: reader.get_record_size(name) for name in reader.get_all_records()}
    except Exception:  # the reader raises RuntimeError and others on damaged archives
        return None


def archive_record(data: bytes, name: str) -> bytes:
    """The bytes of record ``name`` of a torch zip archive (see :func:`archive_records`)."""
    return bytes(torch._C.PyTorchFileReader(io.BytesIO(data)).get_record(name))


def aten_operator(target: object) -> str | None:
    """The name of an ATen operator called by a graph node (``"relu"`` for ``aten.relu.default``), else None.

    Graph nodes of ``torch.export`` call ``torch._ops.OpOverload`` objects, whose ``namespace`` and ``_opname``
    name the operator.
    """
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return target._opname
    return None


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware, so that bf16 autocast pays.

    CUDA: compute capability 8.0 or newer (Ampere on), as ``torch.cuda.is_bf16_supported(including_emulation=False)``
    reports for the current device. CPU: the AVX512-BF16 or AMX instructions, with which oneDNN runs bf16
    convolutions in hardware, as torch's private ``torch.cpu._is_avx512_bf16_supported`` and
    ``_is_amx_tile_supported`` report them. Any other device: False.
    """
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False
