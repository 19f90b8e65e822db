"""The runs the benchmarks share on the embedded MNIST-5k: clean models, victims and REFINE jobs, trained once.

Each run is trained once per seed and reused, so a killed benchmark continues where it stopped.

Layout under a run folder (``<name>`` is ``s<seed>`` for the small CNN, ``<arch>_s<seed>`` for another victim
architecture)::

    clean_<name>/               the victim config alone: the clean model, reference of the ASR floor
    <attack>_<name>/victim/     the victim config with configs/attacks/<attack>.yaml
    <attack>_<name>/<recipe>/   a REFINE recipe's job on that victim: report.json, and timing.json once tested

The seed drives every seeded choice of a run: ``seed_everything`` (initialisation, data order, augmentation),
the attack's own seed (poisoned samples, patterns, per-sample transformations) and the REFINE remap.
"""

import json
import math
import subprocess
import time
from functools import partial
from pathlib import Path
from typing import Any

from refine_pl.configs import resolve_config
from refine_pl.pipeline import DEFAULT_REFINE_CONFIGS, run_defense, train_victim

REPO = Path(__file__).resolve().parents[1]
VICTIM_CONFIG = "configs/victim/mnist.yaml"
ATTACKS = ("badnets", "blended", "wanet", "physical_ba", "iad", "lc", "batt", "adaptive_patch")
"""Config names under configs/attacks/, in the order of the REFINE paper's tables."""
RECIPES = {
    "refine": DEFAULT_REFINE_CONFIGS,
    "reference": ["configs/refine/reference.yaml", "configs/refine/mnist_reference.yaml"],
}
"""REFINE configs by recipe: the main job's (the project's MNIST config), and the reference recipe unchanged on MNIST.
Like every config name here, resolved by :func:`~refine_pl.configs.resolve_config` when the jobs run."""
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
DEFAULT_ARCH = "small_cnn"
"""The victim architecture of configs/victim/mnist.yaml."""


def configs_version(configs: list[str]) -> str:
    """The version of a recipe: the last commit of its config files, ``+changes`` if they differ from it."""
    files = [resolve_config(config) for config in configs]
    try:
        git = partial(subprocess.run, cwd=REPO, capture_output=True, text=True, check=True)
        commit = git(["git", "log", "-1", "--format=%h", "--", *files]).stdout.strip()
        changed = git(["git", "status", "--porcelain", "--", *files]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return (commit or "uncommitted") + ("+changes" if changed else "")


def committed_record(record: Path, configs: list[str]) -> tuple[str, list[str]] | None:
    """The text of ``record`` as last committed, and the files of ``configs`` changed since that commit.

    A config counts as changed when a later commit changed it or it has changes not committed.

    Returns:
        The committed text and the changed configs' paths in the repository (empty when none changed), or None
        when ``record`` is in no commit (a results file outside the repository or never committed) or git cannot
        tell.
    """
    files = [str(resolve_config(config)) for config in configs]
    git = partial(subprocess.run, cwd=REPO, capture_output=True, text=True, check=True)
    try:
        commit = git(["git", "log", "-1", "--format=%H", "--", str(record.resolve())]).stdout.strip()
        if not commit:
            return None
        text = git(["git", "show", f"{commit}:./{record.resolve().relative_to(REPO)}"]).stdout
        later = git(["git", "log", "--format=", "--name-only", f"{commit}..HEAD", "--", *files]).stdout.split()
        uncommitted = [line[3:] for line in git(["git", "status", "--porcelain", "--", *files]).stdout.splitlines()]
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None
    return text, sorted({*later, *uncommitted})


def attack_config(attack: str) -> str:
    """The config of ``attack`` under configs/attacks/."""
    return f"configs/attacks/{attack}.yaml"


def run_name(seed: int, arch: str = DEFAULT_ARCH) -> str:
    """The part of a run's folder name that says its seed and, unless it is the small CNN, its architecture."""
    return f"s{seed}" if arch == DEFAULT_ARCH else f"{arch}_s{seed}"


def _victim_arguments(seed: int, arch: str, extra: list[str] | None) -> list[str]:
    return [*QUIET, "--seed_everything", str(seed), "--model.init_args.arch", arch, *(extra or [])]


def clean_model(run_dir: Path, seed: int, extra: list[str] | None = None, arch: str = DEFAULT_ARCH) -> Path:
    """The clean model of ``seed`` (trained, resumed or found finished); returns its final checkpoint."""
    return train_victim(
        [VICTIM_CONFIG], run_dir / f"clean_{run_name(seed, arch)}", _victim_arguments(seed, arch, extra)
    )


def victim(run_dir: Path, attack: str, seed: int, extra: list[str] | None = None, arch: str = DEFAULT_ARCH) -> Path:
    """The victim of ``attack`` with ``seed`` (trained, resumed or found finished); returns its final checkpoint.

    Args:
        run_dir: The benchmark's run folder.
        attack: Name of a config under configs/attacks/.
        seed: Seed of the victim's training and of the attack's choices.
        extra: More train.py arguments of the victim job.
        arch: Registered victim architecture.
    """
    arguments = [*_victim_arguments(seed, arch, extra), "--data.init_args.attack.init_args.seed", str(seed)]
    folder = victim_folder(run_dir, attack, seed, arch)
    timing = folder / "timing.json"
    if timing.is_file():
        return train_victim([VICTIM_CONFIG, attack_config(attack)], folder, arguments)
    resumed, start = folder.exists(), time.perf_counter()
    checkpoint = train_victim([VICTIM_CONFIG, attack_config(attack)], folder, arguments)
    timing.write_text(json.dumps({"seconds": time.perf_counter() - start, "resumed": resumed}) + "\n")
    return checkpoint


def victim_folder(run_dir: Path, attack: str, seed: int, arch: str = DEFAULT_ARCH) -> Path:
    """The folder of the victim job of ``attack`` with ``seed``."""
    return run_dir / f"{attack}_{run_name(seed, arch)}" / "victim"


def victim_seconds(run_dir: Path, attack: str, seed: int, arch: str = DEFAULT_ARCH) -> float:
    """Wall clock of the victim's training (the attack's cost); NaN when it is not known whole.

    :func:`victim` writes ``timing.json`` in the victim's folder the first time it runs the job; ``resumed`` there
    says the folder already held a job (continued from a checkpoint, or finished before timings were kept), whose
    seconds cover only part of the training.
    """
    timing = victim_folder(run_dir, attack, seed, arch) / "timing.json"
    if not timing.is_file():
        return math.nan
    record = json.loads(timing.read_text())
    return math.nan if record["resumed"] else record["seconds"]


def finished(run_dir: Path, attack: str, recipe: str, seed: int, arch: str = DEFAULT_ARCH) -> bool:
    """Whether the REFINE job of ``recipe`` on the victim of ``attack`` and ``seed`` has finished (report, timing)."""
    job = run_dir / f"{attack}_{run_name(seed, arch)}" / recipe
    return (job / "report.json").is_file() and (job / "timing.json").is_file()


def defended_report(
    run_dir: Path,
    attack: str,
    recipe: str,
    seed: int,
    victim_checkpoint: Path,
    clean_reference: Path,
    extra: list[str] | None = None,
    arch: str = DEFAULT_ARCH,
) -> tuple[dict[str, Any], float]:
    """The report of REFINE (``recipe``, remap and training seeded with ``seed``) on a victim, and its seconds.

    Seconds are the wall clock of the REFINE stage (fit and test) when it ran; a finished job's are read back from
    its ``timing.json`` (marked ``resumed`` there when the stage was continued from a checkpoint).
    """
    job = run_dir / f"{attack}_{run_name(seed, arch)}" / recipe
    timing = job / "timing.json"
    if not finished(run_dir, attack, recipe, seed, arch):
        resumed = job.exists()
        start = time.perf_counter()
        arguments = [*QUIET, "--seed_everything", str(seed), "--model.init_args.remap_seed", str(seed), *(extra or [])]
        run_defense(victim_checkpoint, RECIPES[recipe], job, arguments, clean_reference)
        timing.write_text(json.dumps({"seconds": time.perf_counter() - start, "resumed": resumed}) + "\n")
    return finished_report(run_dir, attack, recipe, seed, arch)


def finished_report(
    run_dir: Path, attack: str, recipe: str, seed: int, arch: str = DEFAULT_ARCH
) -> tuple[dict[str, Any], float]:
    """The report of a :func:`finished` REFINE job and the seconds of its stage (see :func:`defended_report`)."""
    job = run_dir / f"{attack}_{run_name(seed, arch)}" / recipe
    return json.loads((job / "report.json").read_text()), json.loads((job / "timing.json").read_text())["seconds"]
