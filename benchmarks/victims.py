"""The victims the benchmarks defend: the victim of attack A with seed S on the embedded MNIST-5k, trained once.

Layout: ``<root>/<attack>_s<seed>/`` (``clean_s<seed>`` without an attack; root ``runs/victims`` by default) is the
run folder of the victim job (``configs/victim/mnist.yaml`` merged with ``configs/attacks/<attack>.yaml``, the
seed given to ``--seed_everything`` and to the attack), with ``checkpoints/``, ``config.yaml`` and logs, plus
``victim.json``, written with ``attack``, ``seed`` and ``args`` (the extra CLI arguments) when the job starts and
completed when training has finished::

    {"attack": "badnets", "seed": 0, "args": [], "checkpoint": "checkpoints/last.ckpt", "seconds": 101.3,
     "resumed": false}

``seconds`` is the wall clock of the victim job (of its last part when ``resumed``). A finished victim is reused
without starting its job again (for LC and IAD a resumed job would repeat the attack's preparation); an unfinished
one is resumed from its last checkpoint. A folder whose victim was started with other ``args`` is refused.
"""

import json
import time
from pathlib import Path
from typing import Any, NamedTuple

from refine_pl.checkpoints import run_checkpoints
from refine_pl.errors import ConfigError
from refine_pl.pipeline import REPOSITORY, train_victim

VICTIM_CONFIG = "configs/victim/mnist.yaml"
ATTACKS = ("badnets", "blended", "wanet", "physical_ba", "iad", "lc", "batt", "adaptive_patch")
"""Config names under configs/attacks/, in the order of the REFINE paper's tables."""
RECORD = "victim.json"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
"""CLI arguments that keep a benchmark's log to the figures: no progress bar, no model summary."""


class Victim(NamedTuple):
    """A trained victim: its final checkpoint, and the wall clock of its job (of the last part when resumed)."""

    checkpoint: Path
    seconds: float
    resumed: bool


def run_record(path: Path, started: dict[str, Any]) -> dict[str, Any]:
    """The record of a benchmark run (a JSON file at ``path``), or ``started`` when there is none yet.

    Raises:
        ConfigError: The run was started with other ``args`` than ``started``'s: resuming it would continue another
            run's training with these settings, reusing it would report other settings' figures.
    """
    record = json.loads(path.read_text()) if path.is_file() else started
    if record["args"] != started["args"]:
        raise ConfigError(
            f"{path.parent} holds a run started with the arguments {record['args']}, not {started['args']}: delete "
            "the folder or use another one."
        )
    return record


def victim_folder(root: str | Path, attack: str | None, seed: int) -> Path:
    """The run folder of the victim of ``attack`` (None: a clean model) trained with ``seed``."""
    return Path(root) / f"{attack or 'clean'}_s{seed}"


def victim_job(attack: str | None, seed: int) -> tuple[list[str], list[str]]:
    """``(configs, seed arguments)`` of the victim job of ``attack`` with ``seed``."""
    configs = [VICTIM_CONFIG, *([f"configs/attacks/{attack}.yaml"] if attack else [])]
    seeds = ["--seed_everything", str(seed)]
    if attack:
        seeds += ["--data.init_args.attack.init_args.seed", str(seed)]
    return configs, seeds


def find_or_train_victim(
    attack: str | None, seed: int = 0, root: str | Path = "runs/victims", args: list[str] | None = None
) -> Victim:
    """The victim of ``attack`` with ``seed``: found finished, resumed or trained.

    Args:
        attack: Config name under ``configs/attacks/`` (see :data:`ATTACKS`), or None for a clean model.
        seed: Seed of the victim job and of the attack.
        root: Folder of the victims.
        args: Extra CLI arguments of the victim job (e.g. ``["--trainer.max_epochs", "2"]``).

    Raises:
        ConfigError: The attack has no config, or the folder holds a victim trained with other ``args``.
    """
    if attack is not None and not (REPOSITORY / "configs" / "attacks" / f"{attack}.yaml").is_file():
        raise ConfigError(f"No attack config configs/attacks/{attack}.yaml; known attacks: {', '.join(ATTACKS)}.")
    args = list(args or [])
    folder = victim_folder(root, attack, seed)
    record_path = folder / RECORD
    record = run_record(record_path, {"attack": attack, "seed": seed, "args": args})
    if "checkpoint" not in record:
        folder.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        configs, seeds = victim_job(attack, seed)
        resumed = bool(run_checkpoints(folder))
        start = time.perf_counter()
        checkpoint = train_victim(configs, folder, [*seeds, *QUIET, *args])
        record.update(
            checkpoint=str(checkpoint.relative_to(folder)),
            seconds=round(time.perf_counter() - start, 1),
            resumed=resumed,
        )
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    return Victim(folder / record["checkpoint"], record["seconds"], record["resumed"])
