"""The LightningCLI of refine-pl (``refine-pl fit|validate|test|predict --config ...``, or ``python train.py ...``)."""

import importlib
import itertools
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError
from pytorch_lightning import LightningDataModule, LightningModule, Trainer
from pytorch_lightning.cli import ArgsType, LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn

from refine_pl.checkpoints import (
    CHECKPOINT_FOLDER,
    newest_complete_checkpoint,
    read_training_checkpoint,
    run_checkpoints,
)
from refine_pl.configs import resolve_config
from refine_pl.console import exit_on_config_error
from refine_pl.defended_module import DefendedLitModule
from refine_pl.errors import ConfigError, cli_flag
from refine_pl.internals import config_error_cause, parse_failure
from refine_pl.run_folder import check_run_folder, recorded_settings, run_lock, start_over, write_record

LINKED_DATA_FACTS = ("num_classes", "in_channels", "image_size", "mean", "std")
"""Datamodule properties passed to the model, so they are never typed twice."""

DESCRIPTION = (
    "refine-pl: the REFINE backdoor defense as a LightningCLI (fit, validate, test, predict with --config files). "
    "To defend your own model in one command: refine-pl defend MODEL IMAGES (see refine-pl defend --help)."
)
"""The first lines of ``refine-pl --help``."""

RUN_RECORD = "run.json"
"""The settings a ``fit`` was started with, in its run folder."""

UNRECORDED = ("victim_checkpoint", "clean_reference")
"""Model arguments a run's record leaves out: paths that change when a folder moves. The victim is checked by its
content on resume (its sha256 is in every checkpoint); the clean reference is only used by ``test``."""


def _with_resolved_configs(args: list[str]) -> list[str]:
    """``args`` with every ``--config`` file resolved by :func:`~refine_pl.configs.resolve_config`."""
    resolved = []
    for position, arg in enumerate(args):
        if position > 0 and args[position - 1] == "--config":
            arg = resolve_config(arg)
        elif arg.startswith("--config="):
            arg = "--config=" + resolve_config(arg.removeprefix("--config="))
        resolved.append(arg)
    return resolved


class RefineCLI(LightningCLI):
    """LightningCLI with the data facts linked to the model and two conveniences.

    - Without a logger in the config, logs (TensorBoard) and checkpoints go straight into
      ``trainer.default_root_dir``, with no ``lightning_logs/version_N`` levels, so every job's outputs
      have a fixed place and ``--ckpt_path last`` finds them again.
    - A REFINE job whose datamodule names no attack evaluates the attack recorded in the victim
      checkpoint (``RefineDataModule.use_recorded_attack``), so the poisoned test set is rebuilt exactly as the
      victim was trained.

    A checkpoint given with ``--ckpt_path`` is loaded with ``weights_only=True`` unless ``--weights_only false``
    says otherwise, whatever torch's default: a checkpoint that would unpickle Python objects is refused.

    The run folder's ``config.yaml`` is the config of its last ``fit``, ``validate`` or ``test``, which ``test
    --config RUN/config.yaml`` reads back; ``predict`` does not replace it.

    A ``fit`` holds the run folder's lock (:func:`~refine_pl.run_folder.run_lock`) from before its checks to its
    end, and records the model, data and seed it was started with in ``run.json``: resuming with others is refused
    (see :func:`fit_settings`); ``--fresh true`` moves the folder's earlier run aside and starts anew.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._held = ExitStack()
        self._fit_record: tuple[Path, dict[str, Any]] | None = None
        with self._held:
            super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        for fact in LINKED_DATA_FACTS:
            parser.link_arguments(f"data.{fact}", f"model.init_args.{fact}", apply_on="instantiate")
        parser.add_argument(
            "--fresh", type=bool, default=False,
            help="fit only: move an earlier run in --trainer.default_root_dir aside (to <folder>.replaced-<time>) and "
            "start anew",
        )  # fmt: skip

    def _parse_ckpt_path(self) -> None:
        # Lightning's LightningCLI would merge the hyper-parameters saved in the --ckpt_path checkpoint into the
        # config here, so that a stored value overrides the one given now: the victim path of a run folder that
        # has since been moved would win over --model.init_args.victim_checkpoint. refine-pl's configs name every
        # value, so the config and the command line decide; the checkpoint restores weights and training state.
        # What this step does instead: decide which checkpoint the command uses, before anything is built.
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            config = self.config[subcommand]
            root = Path(config["trainer"].get("default_root_dir") or ".")
            check_run_folder(root, CHECKPOINT_FOLDER)
            if config.get("fresh") and subcommand != "fit":
                raise ConfigError(f"--fresh starts a fit anew; `{subcommand}` writes no run: drop --fresh.")
            if subcommand == "fit" and rank_zero_only.rank == 0:
                if config.get("fresh"):
                    start_over(root)
                self._held.enter_context(run_lock(root))
            config["ckpt_path"] = checked_ckpt_path(
                subcommand,
                config.get("ckpt_path"),
                root,
                weights_only=config.get("weights_only") is not False,
                trains=model_trains(config["model"].get("class_path")),
            )
            if subcommand == "fit" and rank_zero_only.rank == 0:
                self._fit_record = checked_fit_record(root, fit_settings(config))

    def before_fit(self) -> None:
        if self._fit_record is not None:  # written once the fit starts: a refused command leaves nothing behind
            write_record(*self._fit_record)

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        # LightningCLI warns when it is given args while sys.argv holds arguments too. pipeline.py and the
        # benchmarks call it with each stage's args from inside their own command line, which is no mistake.
        argv, sys.argv = sys.argv, sys.argv[:1] if args is not None else sys.argv
        try:
            super().parse_arguments(parser, args)
        finally:
            sys.argv = argv

    def before_instantiate_classes(self) -> None:
        if self.subcommand is not None and self.config[self.subcommand].get("weights_only") is None:
            self.config[self.subcommand]["weights_only"] = True
        # The link from the data replaces a value given on the model side when the classes are built: keep what was
        # given, so that after_instantiate_classes can refuse one the data contradicts instead of ignoring it.
        config = self.config[self.subcommand] if self.subcommand is not None else self.config
        init_args = config.get("model", {}).get("init_args") or {}
        self._model_side_facts = {fact: init_args.get(fact) for fact in LINKED_DATA_FACTS if init_args.get(fact)}

    def instantiate_classes(self) -> None:
        # jsonargparse wraps an exception raised by a constructor in a long ValueError about the config's
        # types; the ConfigError it was caused by is the message the user needs.
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause = config_error_cause(error)
            if cause is None:
                raise
            raise cause from None

    def after_instantiate_classes(self) -> None:
        for fact, given in self._model_side_facts.items():
            linked = getattr(self.datamodule, fact, None)
            if linked is not None and _plain(given) != _plain(linked):
                raise ConfigError(
                    f"{cli_flag('model', fact)} {_plain(given)} cannot take effect: the model's {fact} is linked from "
                    f"the data, which has {_plain(linked)}; state it on the data source instead "
                    f"({cli_flag('data', 'source', fact)})."
                )
        if isinstance(self.model, DefendedLitModule) and hasattr(self.datamodule, "use_recorded_attack"):
            self.datamodule.use_recorded_attack(self.model.victim_record)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self.subcommand == "predict":
            # predict reads a run and writes predictions.csv: it leaves the run's config.yaml (the fit's or test's) as
            # it is, since a predict config (return_predictions) cannot be read back by `test --config RUN/config.yaml`.
            self.save_config_callback = None
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("logger") in (None, True) and "logger" not in kwargs:
            root = trainer_config.get("default_root_dir") or "."
            kwargs["logger"] = TensorBoardLogger(save_dir=root, name="", version="")
        return super().instantiate_trainer(**kwargs)


def _plain(value: Any) -> Any:
    """A data fact as plain Python (a tuple or list of numbers as a list of floats), to compare and print."""
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value


NEEDS_TRAINED_WEIGHTS = ("validate", "test", "predict")


def fit_settings(config: Any) -> dict[str, Any]:
    """What decides a fit's result, from its parsed config: the model and data (without :data:`UNRECORDED`), the seed.

    The trainer's settings are left out: a resume may change the devices, or stop at another ``max_steps``
    (a schedule that depends on ``max_epochs`` refuses another length itself, see
    :meth:`~refine_pl.schedules.WarmupCosineLR.load_state_dict`).
    """
    model = config["model"].as_dict()
    model["init_args"] = {k: v for k, v in model.get("init_args", {}).items() if k not in UNRECORDED}
    return {"model": model, "data": config["data"].as_dict(), "seed_everything": config.get("seed_everything")}


def checked_fit_record(root: Path, settings: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The record of a fit into ``root`` with ``settings`` and its path; a run there must have been started with them.

    Raises:
        ConfigError: ``root`` holds checkpoints of a run whose ``run.json`` names other settings.
    """
    path = root / RUN_RECORD
    if run_checkpoints(root):
        recorded_settings(
            path, settings, "resume it with those settings, start over with --fresh true, or fit into another "
            "--trainer.default_root_dir"
        )  # fmt: skip
    return path, settings


def model_trains(class_path: str | None) -> bool:
    """The ``trains`` attribute of the LightningModule class a config names (True when it has none).

    Read from the class before anything is built, so that the checkpoint rules of :func:`checked_ckpt_path` can
    depend on it.
    """
    if not class_path:
        return True
    module, _, name = class_path.rpartition(".")
    return bool(getattr(getattr(importlib.import_module(module), name, None), "trains", True))


def checked_ckpt_path(
    subcommand: str, ckpt_path: str | None, root: Path, weights_only: bool = True, trains: bool = True
) -> str | None:
    """The checkpoint a command uses, checked before anything is built or written.

    - ``fit`` without ``--ckpt_path`` in a folder that already holds checkpoints is refused (it would train
      over a finished or interrupted run); ``validate``, ``test`` and ``predict`` without one are refused (they
      would evaluate and report untrained weights) unless the model has nothing to train (``trains`` False: a
      training-free defense), which is what it is without a checkpoint and has no ``fit``.
    - ``last`` is the newest checkpoint of the run that reads completely (see
      :func:`~refine_pl.checkpoints.newest_complete_checkpoint`); a run with none is refused.
    - A named file must read as a training checkpoint; if it does not, the error offers the run's newest
      complete one. ``best`` is refused: a refine-pl run monitors no metric, so it keeps no best checkpoint.
      ``hpc`` is left to Lightning.

    Returns:
        The path to pass to the trainer (None for a fresh ``fit``).

    Raises:
        ConfigError: In each refused case above, naming the file or folder and the flag that fixes it.
    """
    folder = root / CHECKPOINT_FOLDER
    if not trains and subcommand == "fit":
        raise ConfigError(
            "This model has nothing to train (a training-free defense): run `test` (or `validate`) without "
            "--ckpt_path instead of `fit`."
        )
    if ckpt_path is None:
        if subcommand in NEEDS_TRAINED_WEIGHTS and trains:
            raise ConfigError(
                f"`{subcommand}` without --ckpt_path would use untrained weights: pass --ckpt_path last (the newest "
                f"checkpoint in {folder}) or --ckpt_path FILE."
            )
        if subcommand == "fit" and run_checkpoints(root):
            raise ConfigError(
                f"{root} already holds a run ({', '.join(p.name for p in run_checkpoints(root)[:3])} in {folder}): "
                "resume it with --ckpt_path last, or train anew in another --trainer.default_root_dir."
            )
        return None
    if ckpt_path == "best":
        raise ConfigError(
            f"--ckpt_path best: a refine-pl run monitors no metric, so it keeps no best checkpoint: pass last (the "
            f"newest complete checkpoint in {folder}) or a file of it."
        )
    if ckpt_path == "hpc":
        return ckpt_path
    newest, unreadable = newest_complete_checkpoint(root, weights_only)
    if ckpt_path == "last":
        if newest is None:
            found = f" ({len(unreadable)} unreadable: {next(iter(unreadable.values()))})" if unreadable else ""
            raise ConfigError(
                f"--ckpt_path last: no complete checkpoint in {folder}{found}. Check --trainer.default_root_dir, or "
                "run fit first."
            )
        for path, reason in unreadable.items():
            rank_zero_warn(f"Skipping {path}: {reason} Resuming from {newest}, the newest complete checkpoint.")
        return str(newest)
    try:
        read_training_checkpoint(ckpt_path, weights_only)
    except ConfigError as error:
        offer = f" The newest complete checkpoint of this run is {newest}: pass it, or `last`." if newest else ""
        raise ConfigError(f"{error}{offer}") from None
    return ckpt_path


def _config_files(args: list[str]) -> list[str]:
    """The ``--config`` files of a command line, in order."""
    files = []
    for previous, arg in itertools.pairwise(["", *args]):
        if previous == "--config" or arg.startswith("--config="):
            files.append(arg.removeprefix("--config="))
    return files


def _read_yaml(path: str) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _names(config: Any, keys: list[str]) -> bool:
    """Whether a config file's content holds the dotted ``keys`` (``["trainer", "max_epochs"]``)."""
    for key in keys:
        if not isinstance(config, dict) or key not in config:
            return False
        config = config[key]
    return True


def parse_error_line(error: ArgumentError, args: list[str]) -> str:
    """What jsonargparse refused in ``args``, in one line: the flag, the config file that sets it, and the fix.

    A config file that is not YAML is named with the line and column of the mistake (jsonargparse names no file).
    """
    failure = parse_failure(error)
    subcommand = next((arg for arg in args[:1] if arg in RefineCLI.subcommands()), None)
    help_hint = f"see `refine-pl {subcommand + ' ' if subcommand else ''}--help` for the options."
    files = _config_files(args)
    if failure.syntax:
        for path in files:
            try:
                yaml.safe_load(Path(path).read_text())
            except yaml.MarkedYAMLError as mistake:
                mark = mistake.problem_mark
                at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                return f"{path} is not valid YAML ({mistake.problem}{at}): fix the file, or {help_hint}"
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue
        return f"A value is not valid YAML ({failure.reason}): fix it, or {help_hint}"
    reason = failure.reason.rstrip(".")
    if not failure.keys:
        return f"{reason}: {help_hint}"
    flag = "--" + ".init_args.".join(failure.keys)
    setters = [file for file in files if _names(_read_yaml(file), flag.removeprefix("--").split("."))]
    if any(arg == flag or arg.startswith(f"{flag}=") for arg in args):
        where = " (on the command line)"
    else:
        where = f" (in {setters[-1]})" if setters else ""  # the last config file that sets a key decides it
    return f"{flag}{where}: {reason}; fix it, or {help_hint}"


def cli_main(args: ArgsType = None, run: bool = True) -> RefineCLI:
    """Runs the CLI on ``args`` (``sys.argv[1:]`` when None) and returns it, for scripts and tests.

    ``--config`` files are resolved by :func:`~refine_pl.configs.resolve_config`, so the ``configs/...`` names of
    the shipped configs work from any folder.

    Raises:
        ConfigError: The command line or a config file does not parse (a misspelt key, a wrong type, a file that
            is not YAML, an unknown class path), in one line from :func:`parse_error_line`; or any check of the
            job's input.
    """
    if args is None or isinstance(args, list):
        args = _with_resolved_configs(sys.argv[1:] if args is None else args)
    try:
        return RefineCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "description": DESCRIPTION,
                "exit_on_error": False,
                **{name: {"exit_on_error": False} for name in RefineCLI.subcommands()},
            },
            args=args,
            run=run,
        )
    except ArgumentError as error:
        raise ConfigError(parse_error_line(error, args if isinstance(args, list) else [])) from None


def run() -> None:
    """The LightningCLI of the console command ``refine-pl`` (:func:`refine_pl.commands.run`) on ``sys.argv``.

    A ConfigError ends it with one line and exit status 1.
    """
    exit_on_config_error(cli_main)
