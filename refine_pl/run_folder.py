"""What a run folder was started with, who is writing into it now, and starting it over.

Every job that writes into a folder and continues there when run again (a CLI ``fit``, the pipeline, the
benchmarks' runs) records its settings in a JSON file when it starts (:func:`recorded_settings`): run again with
other settings, it is refused instead of continuing one run's training, or reusing its results, under the other
settings. A ``fit`` also holds a lock file for its whole life (:func:`run_lock`), so two jobs started at once
into one folder cannot overwrite each other's files.
"""

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_warn

from refine_pl.errors import ConfigError

LOCK = "run.lock"
"""The lock file of a run folder, held while a ``fit`` writes into it."""


def recorded_settings(path: Path, settings: dict[str, Any], fix: str) -> dict[str, Any]:
    """The record in ``path`` if it was started with ``settings``, or a new record of them (not yet written).

    Args:
        path: The folder's record (a JSON object), which may not exist yet.
        settings: What the run is started with now, as JSON values; each key is compared with the record's.
        fix: What the user can do instead, ending the error message (e.g. a flag that starts over).

    Raises:
        ConfigError: The record holds another value for a key of ``settings``.
    """
    settings = json.loads(json.dumps(settings, default=str))  # as JSON reads them back (tuples become lists)
    record = json.loads(path.read_text()) if path.is_file() else dict(settings)
    for key, value in settings.items():
        difference = _first_difference(key, record.get(key), value)
        if difference is not None:
            name, old, new = difference
            raise ConfigError(
                f"{path.parent} holds a run started with {name} {old}, not {new} (recorded in {path.name}): {fix}."
            )
    return record


def _first_difference(key: str, old: Any, new: Any) -> tuple[str, Any, Any] | None:
    """The first dotted key under ``key`` whose value differs between ``old`` and ``new``, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(set(old) | set(new)):
            difference = _first_difference(f"{key}.{name}", old.get(name), new.get(name))
            if difference is not None:
                return difference
        return None
    return None if old == new else (key, old, new)


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Writes ``record`` to ``path`` as JSON, whole or not at all (a kill leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2, default=str) + "\n")
    partial.replace(path)


def start_over(folder: Path) -> Path | None:
    """Moves ``folder`` aside to ``<folder>.replaced-<UTC time>`` so a run can start anew there; returns the new name.

    Nothing is deleted. None when there is no folder.

    Raises:
        ConfigError: ``folder`` is the working directory or holds it (it cannot be moved from inside), or a live
            process holds its lock.
    """
    if not folder.exists():
        return None
    if Path.cwd().resolve().is_relative_to(folder.resolve()):
        raise ConfigError(f"Cannot start over in {folder}: it holds the working directory; choose a folder below it.")
    _refuse_if_held(folder / LOCK, _lock_holder(folder / LOCK))
    moved = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    folder.rename(moved)
    rank_zero_warn(f"Starting over: the earlier run in {folder} was moved to {moved}.")
    return moved


def _lock_holder(path: Path) -> tuple[str, int] | None:
    """The ``(host, pid)`` a lock file names, or None when it is gone or unreadable (a write cut off)."""
    try:
        host, pid = path.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _alive(host: str, pid: int) -> bool:
    """Whether process ``pid`` of ``host`` may still run (a process of another host cannot be checked: yes)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def _refuse_if_held(path: Path, holder: tuple[str, int] | None) -> None:
    """Raises a ConfigError when ``holder``, the process named by the lock file ``path``, may still run."""
    if holder is not None and _alive(*holder):
        raise ConfigError(
            f"{path.parent} is in use by process {holder[1]} on {holder[0]} (its lock {path}): wait for that job to "
            "end, or run in another folder (--trainer.default_root_dir)."
        )


def check_run_folder(folder: Path, checkpoints: str) -> None:
    """Refuses, before anything is built, a run folder that cannot hold the run's files.

    Args:
        folder: The run folder (``--trainer.default_root_dir``); it may not exist yet.
        checkpoints: The name of the sub-folder that holds the checkpoints.

    Raises:
        ConfigError: ``folder`` is a file, lies under a file, cannot be written into, or its checkpoint sub-folder
            is a file.
    """
    flag = "--trainer.default_root_dir"
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"lies under the file {existing}"
        raise ConfigError(f"{flag} {folder} {where}: pass a folder (it is made if it does not exist).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {folder}: {existing} cannot be written into: pass a folder you can write to.")
    kept = folder / checkpoints
    if kept.exists() and not kept.is_dir():
        raise ConfigError(
            f"{kept} is a file, where the run keeps its checkpoints: move it away, or pass another {flag}."
        )


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Holds ``folder/run.lock`` (this host and process id) while the block runs; removes it at the end.

    A lock left by a process of this host that no longer runs (killed) is taken over with a warning. Folders the
    lock had to create are removed again if nothing else was written into them (a refused job leaves no trace).

    Raises:
        ConfigError: Another live process holds the lock.
    """
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    while True:
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _lock_holder(path)
            _refuse_if_held(path, holder)
            try:
                just_created = holder is None and time.time() - path.stat().st_mtime < 5
            except FileNotFoundError:  # its holder has just removed it
                continue
            if just_created:  # being written by the process that created it
                time.sleep(0.1)
                continue
            rank_zero_warn(f"Taking over {path}: the process {holder} that left it no longer runs.")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(f"{socket.gethostname()} {os.getpid()}\n")
        break
    try:
        yield
    finally:
        if _lock_holder(path) == (socket.gethostname(), os.getpid()):
            path.unlink()
        for parent in created:
            if any(parent.iterdir()):
                break
            parent.rmdir()
