import functools
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning import Trainer

from refine_pl.cli import cli_main, run
from refine_pl.configs import CONFIGS, resolve_config
from refine_pl.errors import ConfigError
from refine_pl.pipeline import config_flags, parse_args
from tests.conftest import (
    BACKDOORED_VICTIM,
    QUIET,
    REFINE_JOB,
    REPO,
    VICTIM_CONFIG,
    CodeOnUnpickle,
    write_victim_checkpoint,
)


def _root(path: Path) -> list[str]:
    return ["--trainer.default_root_dir", str(path), *QUIET]


def test_victim_configs_run_fit_with_fast_dev_run(tmp_path: Path) -> None:
    cli = cli_main(["fit", *BACKDOORED_VICTIM, "--trainer.fast_dev_run", "true", *_root(tmp_path)])
    assert cli.trainer.global_step == 1
    assert cli.model.hparams.num_classes == 10 and cli.model.hparams.in_channels == 1  # linked from the data
    assert cli.datamodule.attack.name == "badnets"
    clean = cli_main(["fit", "--config", VICTIM_CONFIG, "--trainer.fast_dev_run", "true", *_root(tmp_path)])
    assert clean.datamodule.attack is None


def test_refine_config_runs_fit_with_fast_dev_run(victim_checkpoint: Path, tmp_path: Path) -> None:
    args = [*REFINE_JOB, "--model.init_args.victim_checkpoint", str(victim_checkpoint)]
    cli = cli_main(["fit", *args, "--trainer.fast_dev_run", "true", *_root(tmp_path)])
    assert cli.trainer.global_step == 1
    assert cli.datamodule.attack.spec()["name"] == "badnets"  # rebuilt from the victim checkpoint


def _printed_config(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    with pytest.raises(SystemExit) as stop:
        cli_main([*args, "--print_config"])
    assert stop.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_shows_the_merged_victim_job(capsys: pytest.CaptureFixture) -> None:
    config = _printed_config(["fit", *BACKDOORED_VICTIM], capsys)
    assert config["model"]["class_path"] == "refine_pl.VictimLitModule"
    assert config["model"]["init_args"]["arch"] == "small_cnn" and config["trainer"]["max_epochs"] == 12
    attack = config["data"]["init_args"]["attack"]  # the attack overlay merged on top of the victim config
    assert attack["class_path"] == "refine_pl.attacks.BadNets" and attack["init_args"]["patch_size"] == 3


def test_print_config_shows_the_overlay_on_top_of_the_recipe(capsys: pytest.CaptureFixture) -> None:
    config = _printed_config(["fit", *REFINE_JOB], capsys)
    recipe = yaml.safe_load(Path(resolve_config("configs/refine/recipe.yaml")).read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    # From the MNIST overlay:
    assert data["source"]["class_path"] == "datamodules.EmbeddedMNIST" and data["num_workers"] == 0
    # From the recipe, untouched by the overlay:
    assert config["trainer"]["max_epochs"] == recipe["trainer"]["max_epochs"]
    assert config["trainer"]["gradient_clip_val"] == recipe["trainer"]["gradient_clip_val"]
    assert (
        model["transform"]["init_args"]["base_width"]
        == recipe["model"]["init_args"]["transform"]["init_args"]["base_width"]
    )
    assert model["scheduler"]["class_path"] == "refine_pl.schedules.WarmupCosineLR"
    assert data["batch_size"] == recipe["data"]["init_args"]["batch_size"]
    assert {k: data[k] for k in ("augment", "horizontal_flip", "consistency", "val_fraction")} == {
        "augment": True, "horizontal_flip": False, "consistency": True, "val_fraction": 0.1,
    }  # fmt: skip
    assert model["optimizer"]["class_path"] == recipe["model"]["init_args"]["optimizer"]["class_path"]
    assert (model["contrastive_weight"], model["temperature"]) == (0.1, 0.07)
    callbacks = [callback["class_path"] for callback in config["trainer"]["callbacks"]]
    assert callbacks == [
        "callbacks.RunCheckpoint", "callbacks.DefenseReport", "callbacks.ExportDefendedClassifier",
        "callbacks.TransformImageGrid", "callbacks.PredictionCSV", "callbacks.DeploymentFiles",
    ]  # fmt: skip


def _refine_fit(victim: Path, root: Path) -> list[str]:
    return ["fit", *REFINE_JOB, "--model.init_args.victim_checkpoint", str(victim), *_root(root)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_classes": 43}, "num_classes=43 but the data has num_classes=10"),
        ({"in_channels": 3, "mean": (0.5,) * 3, "std": (0.25,) * 3}, "in_channels=3 but the data has in_channels=1"),
    ],
)
def test_victim_that_disagrees_with_the_data_stops_before_training(tmp_path: Path, overrides, message) -> None:
    victim = write_victim_checkpoint(tmp_path / "victim.ckpt", **overrides)
    with pytest.raises(ConfigError, match=message):
        cli_main(_refine_fit(victim, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_missing_victim_checkpoint_stops_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Victim weights not found at .*nope.ckpt"):
        cli_main(_refine_fit(tmp_path / "nope.ckpt", tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unknown_architecture_stops_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Unknown architecture 'resnet9000'; known architectures: .*small_cnn"):
        cli_main(["fit", *BACKDOORED_VICTIM, "--model.init_args.arch", "resnet9000", *_root(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_unknown_attack_class_stops_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^--data.init_args.attack .*has no attribute 'NoSuchAttack'"):
        cli_main(
            ["fit", *BACKDOORED_VICTIM, "--data.init_args.attack", "refine_pl.attacks.NoSuchAttack",
             *_root(tmp_path / "run")]
        )  # fmt: skip
    assert not (tmp_path / "run").exists()


CONFIG_MISTAKES = {
    "misspelt key": (
        "model:\n  init_args:\n    learning_rat: 0.1\n",
        [],
        r"--model.init_args.learning_rat \(in {file}\)",
    ),
    "wrong type": ("trainer:\n  max_epochs: many\n", [], r"--trainer.max_epochs \(in {file}\): Expected a int"),
    "not YAML": ("model:\n  init_args: [oops\n", [], r"{file} is not valid YAML \(.* at line 3, column 1\)"),
    "misspelt flag": ("", ["--model.init_args.learning_rat", "0.1"], r"--model.init_args.learning_rat \(on the comm"),
    "flag type": ("", ["--trainer.max_epochs", "many"], r"--trainer.max_epochs \(on the command line\)"),
    "unknown attack": ("", ["--data.init_args.attack", "refine_pl.attacks.Nope"], r"--data.init_args.attack .*'Nope'"),
    "missing --config": ("", ["--config", "{file}.nope"], r"--config .*File does not exist: '{file}.nope'"),
}


@pytest.mark.parametrize("mistake", CONFIG_MISTAKES)
def test_a_config_mistake_is_one_line_naming_the_file_or_flag_and_help(
    mistake: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    text, flags, message = CONFIG_MISTAKES[mistake]
    config = tmp_path / "mine.yaml"
    config.write_text(text or "{}\n")
    flags = [flag.format(file=config) for flag in flags]
    argv = ["refine-pl", "fit", *BACKDOORED_VICTIM, "--config", str(config), *flags, *_root(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as stop:
        run()
    line = str(stop.value.code)
    assert "\n" not in line and capsys.readouterr().err == ""  # no usage listing before it
    assert re.match("refine-pl: error: " + message.format(file=re.escape(str(config))), line), line
    assert line.endswith("see `refine-pl fit --help` for the options.")
    assert not (tmp_path / "run").exists()


def test_a_nested_value_is_nullable_from_the_command_line_as_in_yaml(tmp_path: Path) -> None:
    nulls = ["--data.init_args.attack", "null", "--model.init_args.scheduler", "null"]
    cli = cli_main([*BACKDOORED_VICTIM, *nulls, *_root(tmp_path)], run=False)
    assert cli.datamodule.attack is None and cli.model.scheduler_factory is None


def test_unknown_attack_recorded_in_a_checkpoint_stops_before_training(tmp_path: Path) -> None:
    victim = write_victim_checkpoint(tmp_path / "victim.ckpt", attack={"name": "nosuchattack", "init_args": {}})
    with pytest.raises(ConfigError, match="Unknown attack 'nosuchattack'; known attacks: .*badnets"):
        cli_main(_refine_fit(victim, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_py_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "train.py", *_refine_fit(tmp_path / "nope.ckpt", tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("refine-pl: error: Victim weights not found at")
        and "--model.init_args.victim_checkpoint" in last
    )


def test_a_checkpoint_that_would_run_code_is_refused_whatever_torchs_default(
    victim_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default would then unpickle anything
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "extra": CodeOnUnpickle(marker)}, evil)
    args = ["test", *REFINE_JOB, "--model.init_args.victim_checkpoint", str(victim_checkpoint)]
    with pytest.raises(ConfigError, match=f"Refusing to load {evil}: .*could run code") as refused:
        cli_main([*args, "--ckpt_path", str(evil), *_root(tmp_path)])
    assert not marker.exists()
    assert "\n" not in str(refused.value) and "weights_only" not in str(refused.value)


@pytest.mark.slow
def test_the_trainer_loads_ckpt_path_with_weights_only(
    victim_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [*REFINE_JOB, "--model.init_args.victim_checkpoint", str(victim_checkpoint), *_root(tmp_path)]
    tiny = ["--model.init_args.transform.init_args.base_width", "4", "--trainer.limit_val_batches", "0"]
    cli_main(["fit", *args, *tiny, "--trainer.max_steps", "1"])
    asked = []
    test = Trainer.test

    @functools.wraps(test)  # the CLI builds the test subcommand's options from this signature
    def recording_test(self: Trainer, *positional, **keywords):
        asked.append(keywords["weights_only"])
        return test(self, *positional, **keywords)

    monkeypatch.setattr(Trainer, "test", recording_test)
    testing = ["test", *args, *tiny, "--ckpt_path", "last", "--trainer.limit_test_batches", "1"]
    cli_main(testing)
    cli_main([*testing, "--weights_only", "false"])
    assert asked == [True, False]  # the safe load unless the user says otherwise


def test_the_pipeline_finds_its_configs_from_any_folder_and_its_stages_do_not_warn_about_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pipeline.py", "--run-dir", "runs/x"])  # the pipeline's own command line
    options = parse_args(sys.argv[1:])
    flags = config_flags(options.refine_config)
    assert flags[1::2] == [str(CONFIGS / config.removeprefix("configs/")) for config in options.refine_config]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # LightningCLI's "args parameter is intended..." would raise here
        config = _printed_config(["fit", *flags], capsys)
    assert config["trainer"]["default_root_dir"] == "runs/mnist"  # relative: outputs go under the current folder


def test_a_model_side_data_fact_the_data_contradicts_is_refused_and_the_data_side_one_takes_effect(
    untrained_victim: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "suspect.pt"  # bare weights: they record no normalisation of their own
    torch.save(torch.load(untrained_victim, weights_only=True)["state_dict"], weights)
    args = [
        *REFINE_JOB, *QUIET, "--trainer.default_root_dir", str(tmp_path / "run"),
        "--model.init_args.victim_checkpoint", str(weights), "--model.init_args.victim_arch", "small_cnn",
    ]  # fmt: skip
    message = (
        r"--model\.init_args\.mean \[0\.0\] cannot take effect: the model's mean is linked from the data, which has "
        r"\[0\.1307\]; state it on the data source instead \(--data\.init_args\.source\.init_args\.mean\)\.$"
    )
    with pytest.raises(ConfigError, match=message):
        cli_main([*args, "--model.init_args.mean", "[0.0]"], run=False)
    source = "--data.init_args.source.init_args"
    raw = cli_main([*args, f"{source}.mean", "[0.0]", f"{source}.std", "[1.0]"], run=False)
    assert raw.model.victim.mean.flatten().tolist() == [0.0] and raw.model.victim.std.flatten().tolist() == [1.0]
    same = cli_main([*args, "--model.init_args.mean", "[0.1307]"], run=False)  # agrees with the data: harmless
    assert same.model.victim.mean.flatten().tolist() == pytest.approx([0.1307])
