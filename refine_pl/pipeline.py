"""The main job: train a backdoored victim (and a clean model), defend it with REFINE, test all, report BA / ASR.

Each stage is an ordinary ``train.py`` call (see :func:`run_pipeline`), so everything the pipeline does
can also be done by hand, and every stage resumes from its last checkpoint when run again.
"""

import argparse
import json
from pathlib import Path
from typing import Any

from refine_pl.checkpoints import newest_complete_checkpoint, run_checkpoints
from refine_pl.cli import cli_main
from refine_pl.configs import resolve_config
from refine_pl.console import exit_on_config_error
from refine_pl.errors import ConfigError
from refine_pl.run_folder import recorded_settings, start_over, write_record

DEFAULT_VICTIM_CONFIGS = ["configs/victim/mnist.yaml", "configs/attacks/badnets.yaml"]
DEFAULT_REFINE_CONFIGS = ["configs/refine/recipe.yaml", "configs/refine/mnist.yaml"]
RECORD = "pipeline.json"
"""The configs and extra arguments the main job in a run folder was started with."""


def config_flags(configs: list[str]) -> list[str]:
    """``--config`` arguments that merge ``configs`` in order, resolved by :func:`~refine_pl.configs.resolve_config`."""
    return [flag for config in configs for flag in ("--config", resolve_config(config))]


def resume_flag(run_dir: Path) -> list[str]:
    """``--ckpt_path last`` when ``run_dir`` holds checkpoints (a fit there resumes), else nothing."""
    return ["--ckpt_path", "last"] if run_checkpoints(run_dir) else []


def train_victim(victim_configs: list[str], victim_dir: str | Path, victim_args: list[str] | None = None) -> Path:
    """Trains (or resumes, or finds finished) the victim job in ``victim_dir``; returns its final checkpoint.

    Args:
        victim_configs: Configs of the victim job, merged in order (dataset config, then attack config).
        victim_dir: Output folder of the victim job.
        victim_args: Extra CLI arguments of the victim job (e.g. ``["--trainer.max_epochs", "3"]``).
    """
    cli_main(
        [
            "fit",
            *config_flags(victim_configs),
            "--trainer.default_root_dir", str(victim_dir),
            *(victim_args or []),
            *resume_flag(Path(victim_dir)),
        ]
    )  # fmt: skip
    checkpoint, _ = newest_complete_checkpoint(victim_dir)
    if checkpoint is None:
        raise ConfigError(f"The victim job in {victim_dir} ended without a complete checkpoint.")
    return checkpoint


def run_pipeline(
    victim_configs: list[str],
    refine_configs: list[str],
    run_dir: str | Path,
    victim_args: list[str] | None = None,
    refine_args: list[str] | None = None,
    clean_reference: str | Path | None = None,
    predict_root: str | Path | None = None,
) -> dict[str, Any]:
    """Runs victim training, REFINE training and the REFINE test (and prediction); returns the report.

    Outputs: the victim job in ``run_dir/victim``, the REFINE job in ``run_dir`` (``checkpoints/``,
    ``images/``, TensorBoard logs, ``config.yaml``) and the report in ``run_dir/report.json`` and
    ``run_dir/report.md``. A stage whose folder holds checkpoints continues from the newest complete one (a finished
    stage returns at once), so an interrupted job is resumed by running it again.

    Args:
        victim_configs: Configs of the victim job, merged in order (dataset config, then attack config).
        refine_configs: Configs of the REFINE job, merged in order.
        run_dir: Output folder of the whole job.
        victim_args: Extra CLI arguments of the victim job (e.g. ``["--trainer.max_epochs", "3"]``).
        refine_args: Extra CLI arguments of both REFINE stages (fit and test).
        clean_reference: A model trained like the victim without the attack (e.g. by :func:`train_victim` with
            the dataset's victim config alone): the test measures its ASR, the floor, in the same pass.
        predict_root: A folder of images to classify at the end (``run_dir/predictions.csv``), or None.
    """
    run_dir = Path(run_dir)
    victim_checkpoint = train_victim(victim_configs, run_dir / "victim", victim_args)
    return run_defense(victim_checkpoint, refine_configs, run_dir, refine_args, clean_reference, predict_root)


def run_defense(
    victim_checkpoint: str | Path,
    configs: list[str],
    run_dir: str | Path,
    args: list[str] | None = None,
    clean_reference: str | Path | None = None,
    predict_root: str | Path | None = None,
    trains: bool = True,
    test: bool = True,
) -> dict[str, Any] | None:
    """A defense of ``victim_checkpoint`` in ``run_dir``: its training (or resumption), its test; returns the report.

    The one fit / test sequence of the project: the main job's REFINE stage and every defense of the benchmarks
    run through it.

    Args:
        victim_checkpoint: The suspect model's weights.
        configs: Configs of the defense job, merged in order (the REFINE job, then a defense's overlay).
        run_dir: Output folder of the defense job (``report.json`` is written there).
        args: Extra CLI arguments of every stage (fit, test, predict).
        clean_reference: A clean model whose ASR the test measures as the floor (see :func:`run_pipeline`).
        predict_root: A folder of images to classify at the end (``run_dir/predictions.csv``), or None.
        trains: Whether the defense is fitted first (``fit``, then the stages from its last checkpoint); a
            training-free defense (``trains`` of its :data:`~refine_pl.defenses.DEFENSES` entry false) is only
            tested, as it is built.
        test: Whether to test (False for a job without test images: it fits, predicts if asked, and returns None).
    """
    run_dir = Path(run_dir)
    common = [
        *config_flags(configs),
        "--trainer.default_root_dir", str(run_dir),
        "--model.init_args.victim_checkpoint", str(victim_checkpoint),
        *(["--model.init_args.clean_reference", str(clean_reference)] if clean_reference else []),
        *(args or []),
    ]  # fmt: skip
    trained = []
    if trains:
        cli_main(["fit", *common, *resume_flag(run_dir)])
        trained = ["--ckpt_path", "last"]
    if test:
        cli_main(["test", *common, *trained])
    if predict_root is not None:
        cli_main(["predict", *common, *trained, "--data.init_args.predict_root", str(predict_root)])
    return json.loads((run_dir / "report.json").read_text()) if test else None


def add_job_arguments(parser: argparse.ArgumentParser, name: str, jobs: str) -> None:
    """Adds ``--<name>-arg ARG`` to ``parser``: extra train.py arguments of ``jobs``, repeated, kept in order."""
    parser.add_argument(
        f"--{name}-arg", action="append", default=[], metavar="ARG",
        help=f"extra train.py argument of {jobs} (repeat; write --{name}-arg=--flag)",
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line of the main job (``sys.argv[1:]`` when None); see ``python pipeline.py --help``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--victim-config", nargs="+", default=DEFAULT_VICTIM_CONFIGS, metavar="YAML",
        help="configs of the victim job, merged in order (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--refine-config", nargs="+", default=DEFAULT_REFINE_CONFIGS, metavar="YAML",
        help="configs of the REFINE job, merged in order (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--run-dir", default="runs/mnist_badnets", help="output folder of the whole job")
    parser.add_argument(
        "--floor", action=argparse.BooleanOptionalAction, default=True,
        help="also train a clean model (the first victim config alone, in RUN_DIR/clean) and report its ASR, the "
        "floor of every ASR (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--predict-dir", default=None, metavar="FOLDER",
        help="classify the images of this folder with the defended model at the end (RUN_DIR/predictions.csv)",
    )  # fmt: skip
    parser.add_argument(
        "--fresh", action="store_true",
        help="move an earlier job in RUN_DIR aside (to RUN_DIR.replaced-<time>) and start anew; without it, a RUN_DIR "
        "started with other configs or arguments is refused",
    )  # fmt: skip
    add_job_arguments(parser, "victim", "the victim job")
    add_job_arguments(parser, "refine", "the REFINE job")
    return parser.parse_args(argv)


def record_job(args: argparse.Namespace) -> None:
    """Records the configs and extra arguments of the main job in ``RUN_DIR/pipeline.json`` before its first stage.

    Raises:
        ConfigError: ``RUN_DIR`` holds a job started with others (it would reuse that job's victim and report it
            under these settings); ``--fresh`` moves it aside first.
    """
    run_dir = Path(args.run_dir)
    if args.fresh:
        start_over(run_dir)
    settings = {
        "victim_config": args.victim_config,
        "refine_config": args.refine_config,
        "victim_arg": args.victim_arg,
        "refine_arg": args.refine_arg,
        "floor": args.floor,
    }
    fix = "run it again with those settings, start over with --fresh, or choose another --run-dir"
    write_record(run_dir / RECORD, recorded_settings(run_dir / RECORD, settings, fix))


def main(argv: list[str] | None = None) -> None:
    """Runs the main job with the command line ``argv`` (``sys.argv[1:]`` when None)."""
    args = parse_args(argv)
    record_job(args)
    clean = train_victim(args.victim_config[:1], Path(args.run_dir) / "clean", args.victim_arg) if args.floor else None
    run_pipeline(
        args.victim_config, args.refine_config, args.run_dir, args.victim_arg, args.refine_arg, clean, args.predict_dir
    )


def run() -> None:
    """The console command ``refine-pl-pipeline`` (and ``python pipeline.py``): :func:`main` on ``sys.argv``.

    A ConfigError ends it with one line and exit status 1.
    """
    exit_on_config_error(main)
