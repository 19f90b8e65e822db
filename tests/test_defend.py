"""``refine-pl defend MODEL IMAGES``: the own-model job in one command.

What it infers from each kind of model file (and says, one line each), the job it builds from those facts, its
one-line errors, its help, and (slow) whole runs: a torchvision model saved as a bare state_dict fitted without test
folders, then tested on labeled and triggered folders with the run's config.yaml repeating the test, and a grayscale
model whose folders are read in one channel.
"""

import csv
import hashlib
import json
import re
import shlex
import sys
from pathlib import Path

import onnx
import pytest
import torch
import yaml
from torch import nn
from torchvision.models import get_model

from refine_pl import commands
from refine_pl.architectures import build_architecture
from refine_pl.attacks import BadNets, attack_record
from refine_pl.cli import cli_main
from refine_pl.defend import (
    DEFEND_CONFIGS,
    USAGE_EXAMPLES,
    build_parser,
    in_defend_terms,
    infer_model_facts,
    main,
    stage_args,
)
from refine_pl.errors import ConfigError
from refine_pl.export import load_defended, read_description
from refine_pl.pipeline import config_flags
from refine_pl.predict import predict_folder
from tests.conftest import MNIST_FACTS, REPO, write_victim_checkpoint
from tests.test_unlabeled_folder import write_images, write_test_folder

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
SMALL_JOB = [
    "--model.init_args.transform.init_args.base_width", "4",
    "--data.init_args.num_workers", "0",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--data.init_args.min_epoch_samples", "0",
]  # fmt: skip
"""LightningCLI flags passed through after ``--`` in the runs below: a U-Net of first width 4, no worker processes, an
epoch of one pass over the few images."""
WITHOUT_DEPLOYMENT_FORMATS = ["--trainer.callbacks.init_args.formats", "[]"]


def facts_of(*argv: str) -> tuple[dict, list[str]]:
    facts, lines = infer_model_facts(build_parser().parse_args([*argv[:1], "images", *argv[1:]]))
    return vars(facts), lines


def write_torchvision_model(path: Path, num_classes: int = 4) -> Path:
    """MobileNetV3-small saved as a bare state_dict, its classes made to differ between images.

    At its initialisation they barely do.
    """
    torch.manual_seed(0)
    model = get_model("mobilenet_v3_small", num_classes=num_classes)
    with torch.no_grad():
        model.classifier[-1].weight.mul_(300)
    torch.save(model.state_dict(), path)
    return path


def write_grayscale_model(path: Path, num_classes: int = 5) -> Path:
    """refine-pl's small CNN for 1-channel images, saved as DDP's module.-prefixed bare weights."""
    torch.manual_seed(0)
    weights = build_architecture("small_cnn", num_classes, 1).state_dict()
    torch.save({f"module.{key}": value for key, value in weights.items()}, path)
    return path


def export_program(path: Path, channels: int, size: int, num_classes: int, dynamic_size: bool = False) -> Path:
    net = nn.Sequential(nn.Conv2d(channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
    dims = {0: torch.export.Dim("batch")}
    if dynamic_size:
        dims |= {2: torch.export.Dim("height", min=4), 3: torch.export.Dim("width", min=4)}
    program = torch.export.export(net.eval(), (torch.rand(2, channels, size, size),), dynamic_shapes=(dims,))
    torch.export.save(program, path)
    return path


BUILDERS = """
from torch import nn


def build(num_classes, in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


def fixed():
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6))


def mlp(num_classes, in_channels):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 16 * 16, 32), nn.ReLU(), nn.Linear(32, num_classes))


class ChannelMean(nn.Module):
    def forward(self, images):
        return images.mean(1)


def any_channels(num_classes, in_channels):
    return nn.Sequential(ChannelMean(), nn.Flatten(), nn.Linear(16 * 16, num_classes))
"""


# ---- what each kind of model file tells ------------------------------------------------------------------------------


def test_a_torchvision_state_dict_tells_its_classes_and_its_architecture_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_torchvision_model(Path("suspect.pt"))
    facts, lines = facts_of(str(path), "--arch", "mobilenet_v3_small")
    assert facts == {"num_classes": 4, "in_channels": 3, "image_size": 224, **IMAGENET, "arch": "mobilenet_v3_small"}
    assert lines == [
        "Inferred channels 3: torchvision's mobilenet_v3_small takes RGB images.",
        "Inferred --image-size 224: the size mobilenet_v3_small is made for (its ImageNet weights' crop).",
        "Inferred --num-classes 4: classifier.3.weight [4, 1024] in suspect.pt, the classifier layer of "
        "mobilenet_v3_small.",
        "Inferred --mean 0.485 0.456 0.406: ImageNet's, which torchvision's mobilenet_v3_small is trained with.",
        "Inferred --std 0.229 0.224 0.225: ImageNet's, which torchvision's mobilenet_v3_small is trained with.",
    ]
    # docs/own-model.md shows these lines for its one command.
    (printed,) = re.findall(r"^```text\n(.*?)^```", (REPO / "docs" / "own-model.md").read_text(), flags=re.S | re.M)
    assert printed.splitlines() == lines
    # A flag given wins, and is not reported as inferred.
    given = [
        "--arch",
        "mobilenet_v3_small",
        "--num-classes",
        "4",
        "--image-size",
        "64",
        "--mean",
        "0.5",
        "--std",
        "0.2",
    ]
    facts, lines = facts_of(str(path), *given)
    assert facts == {"num_classes": 4, "in_channels": 3, "image_size": 64, "mean": (0.5,) * 3, "std": (0.2,) * 3,
                     "arch": "mobilenet_v3_small"}  # fmt: skip
    assert lines == ["Inferred channels 3: torchvision's mobilenet_v3_small takes RGB images."]


def test_a_grayscale_network_tells_its_channels_by_its_first_convolution(tmp_path: Path) -> None:
    path = write_grayscale_model(tmp_path / "digits.pt")
    facts, lines = facts_of(str(path), "--arch", "small_cnn", "--mean", "0.5", "--std", "0.25")
    assert facts == {"num_classes": 5, "in_channels": 1, "image_size": 28, "mean": (0.5,), "std": (0.25,),
                     "arch": "small_cnn"}  # fmt: skip
    assert lines == [
        f"Inferred channels 1: 0.0.weight [32, 1, 3, 3] in {path}, the first convolution of small_cnn.",
        "Inferred --image-size 28: the size small_cnn is made for (refine-pl's registry).",
        f"Inferred --num-classes 5: 11.weight [5, 256] in {path}, the classifier layer of small_cnn.",
    ]
    # No normalisation is known for it: asked for, and given one value per channel.
    with pytest.raises(ConfigError, match=r"normalisation .*digits.pt expects cannot be told .*--mean 0 --std 1 for"):
        facts_of(str(path), "--arch", "small_cnn")
    with pytest.raises(ConfigError, match="^--mean has 3 values for a 1-channel model: give one per channel"):
        facts_of(str(path), "--arch", "small_cnn", "--mean", "0.1", "0.2", "0.3", "--std", "1")
    with pytest.raises(ConfigError, match="^--mean and --std go together"):
        facts_of(str(path), "--arch", "small_cnn", "--mean", "0.1")


def test_a_torch_export_archive_tells_its_channels_size_and_classes(tmp_path: Path) -> None:
    path = export_program(tmp_path / "gray.pt2", channels=1, size=20, num_classes=3)
    facts, lines = facts_of(str(path), "--mean", "0", "--std", "1")
    assert facts == {"num_classes": 3, "in_channels": 1, "image_size": 20, "mean": (0.0,), "std": (1.0,), "arch": None}
    assert lines == [
        f"Inferred channels 1: the input spec of {path}, [dynamic, 1, 20, 20].",
        f"Inferred --image-size 20: the input spec of {path}, [dynamic, 1, 20, 20].",
        f"Inferred --num-classes 3: the output width of {path} on one image.",
    ]
    with pytest.raises(ConfigError, match=r"gray.pt2 is a torch.export archive, which holds its own network: drop --"):
        facts_of(str(path), "--arch", "small_cnn", "--mean", "0", "--std", "1")
    dynamic = export_program(tmp_path / "any_size.pt2", channels=3, size=20, num_classes=4, dynamic_size=True)
    with pytest.raises(
        ConfigError, match=r"any_size.pt2 was exported for images of any size \(input \[dynamic, 3, dyn"
    ):
        facts_of(str(dynamic), "--mean", "0", "--std", "1")
    facts, _ = facts_of(str(dynamic), "--mean", "0", "--std", "1", "--image-size", "16")
    assert (facts["num_classes"], facts["in_channels"], facts["image_size"]) == (4, 3, 16)


def test_a_refine_pl_victim_checkpoint_records_everything(tmp_path: Path) -> None:
    path = write_victim_checkpoint(tmp_path / "victim.ckpt")
    facts, lines = facts_of(str(path))
    assert facts == {**MNIST_FACTS, "arch": None}
    where = f"recorded in {path} (a refine-pl victim checkpoint of small_cnn)"
    assert lines == [
        f"Inferred --num-classes 10: {where}.",
        f"Inferred channels 1: {where}.",
        f"Inferred --image-size 28: {where}.",
        f"Inferred --mean 0.1307: {where}.",
        f"Inferred --std 0.3081: {where}.",
    ]


def test_your_own_network_by_import_path_needs_its_image_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_nets.py").write_text(BUILDERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_nets", None)
    import my_nets

    built = tmp_path / "built.pt"
    torch.save(my_nets.build(7, 1).state_dict(), built)
    with pytest.raises(
        ConfigError, match=r"^--arch my_nets:build is your own network, whose image size .*--image-size"
    ):
        facts_of(str(built), "--arch", "my_nets:build", "--mean", "0", "--std", "1")
    facts, lines = facts_of(str(built), "--arch", "my_nets:build", "--image-size", "16", "--mean", "0", "--std", "1")
    assert (facts["num_classes"], facts["in_channels"], facts["image_size"]) == (7, 1, 16)
    assert lines[1] == f"Inferred --num-classes 7: 3.weight [7, 8] in {built}, the classifier layer of my_nets:build."
    # A builder that takes no class count: the class count is the output width of the network with the weights.
    fixed = tmp_path / "fixed.pt"
    torch.save(my_nets.fixed().state_dict(), fixed)
    facts, lines = facts_of(str(fixed), "--arch", "my_nets:fixed", "--image-size", "16", "--mean", "0", "--std", "1")
    assert (facts["num_classes"], facts["in_channels"]) == (6, 1)
    assert (
        lines[1] == f"Inferred --num-classes 6: the output width of my_nets:fixed with {fixed}'s weights on one image."
    )


def test_a_network_without_convolutions_tells_its_channels_by_the_input_layer_its_weights_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_nets.py").write_text(BUILDERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_nets", None)
    import my_nets

    gray = tmp_path / "gray_mlp.pt"
    torch.save(my_nets.mlp(5, 1).state_dict(), gray)
    facts, lines = facts_of(str(gray), "--arch", "my_nets:mlp", "--image-size", "16", "--mean", "0.5", "--std", "0.5")
    assert (facts["num_classes"], facts["in_channels"], list(facts["mean"]), list(facts["std"])) == (5, 1, [0.5], [0.5])
    assert lines[0] == (
        f"Inferred channels 1: 1.weight [32, 256] in {gray}, the input layer of my_nets:mlp built for 1 channel(s)."
    )
    colour = tmp_path / "colour_mlp.pt"
    torch.save(my_nets.mlp(5, 3).state_dict(), colour)
    facts, _ = facts_of(str(colour), "--arch", "my_nets:mlp", "--image-size", "16", "--mean", "0.5", "--std", "0.5")
    assert facts["in_channels"] == 3
    # --channels wins, and a network whose weights fit both channel counts is asked for it in one line.
    facts, lines = facts_of(str(gray), "--arch", "my_nets:mlp", "--image-size", "16", "--mean", "0", "--std", "1",
                            "--channels", "1")  # fmt: skip
    assert facts["in_channels"] == 1 and not any(line.startswith("Inferred channels") for line in lines)
    either = tmp_path / "either.pt"
    torch.save(my_nets.any_channels(5, 1).state_dict(), either)  # the channels are averaged first
    with pytest.raises(ConfigError, match=r"fits both 1 and 3 channels: pass --channels 1 \(grayscale\) or 3"):
        facts_of(str(either), "--arch", "my_nets:any_channels", "--image-size", "16", "--mean", "0", "--std", "1")


def test_weights_that_do_not_fit_the_architecture_are_refused_naming_arch(tmp_path: Path) -> None:
    path = write_torchvision_model(tmp_path / "suspect.pt")
    with pytest.raises(
        ConfigError, match=r"do not fit architecture 'resnet18' \(.* keys missing .*\): check --arch\.$"
    ):
        facts_of(str(path), "--arch", "resnet18")


def test_a_grayscale_resnet_is_not_given_imagenets_rgb_normalisation(tmp_path: Path) -> None:
    path = tmp_path / "xray.pt"
    torch.save(build_architecture("resnet18", 3, 1).state_dict(), path)  # refine-pl's resnet18 takes in_channels
    with pytest.raises(ConfigError, match=r"normalisation .*xray.pt expects cannot be told from the file"):
        facts_of(str(path), "--arch", "resnet18")
    facts, lines = facts_of(str(path), "--arch", "resnet18", "--mean", "0.5", "--std", "0.25")
    assert (facts["in_channels"], facts["num_classes"], facts["image_size"]) == (1, 3, 224)
    assert lines[0] == f"Inferred channels 1: conv1.weight [64, 1, 7, 7] in {path}, the first convolution of resnet18."


def test_a_victim_that_records_its_attack_measures_asr_with_it_not_a_triggered_folder(tmp_path: Path) -> None:
    path = write_victim_checkpoint(tmp_path / "victim.ckpt", attack=attack_record(BadNets()))
    with pytest.raises(ConfigError, match=r"victim.ckpt records the attack it was trained with \(badnets\), .*: drop"):
        facts_of(str(path), "--triggered-root", "t", "--target-label", "0")
    assert facts_of(str(path), "--test-root", "t")[0]["num_classes"] == 10


# ---- the job it builds -----------------------------------------------------------------------------------------------


def test_the_facts_and_options_become_the_lightning_cli_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    write_grayscale_model(tmp_path / "digits.pt")
    argv = [
        "digits.pt", "null", "--arch", "small_cnn", "--mean", "0.5", "--std", "0.25",
        "--class-names", "a b", "2", "c", "d", "e", "--test-root", "test",
        "--max-minutes", "90.5", "--max-epochs", "3", "--batch-size", "8", "--seed", "7",
    ]  # fmt: skip
    args = build_parser().parse_args(argv)
    facts, _ = infer_model_facts(args)
    flags = stage_args(args, facts, Path("runs/x"))
    with pytest.raises(SystemExit):
        cli_main(["fit", *config_flags(DEFEND_CONFIGS), "--model.init_args.victim_checkpoint", "m", *flags,
                  "--print_config"])  # fmt: skip
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["init_args"]["source"] == {
        "class_path": "datamodules.UnlabeledFolder",
        "init_args": {
            "root": "./null",  # a folder YAML would read as something else keeps its name
            "num_classes": 5, "in_channels": 1, "image_size": 28, "mean": [0.5], "std": [0.25],
            "class_names": ["a b", "2", "c", "d", "e"], "test_root": "test", "triggered_root": None,
            "target_label": None, "name": "unlabeled_folder",
        },
    }  # fmt: skip
    assert config["data"]["init_args"]["batch_size"] == 8 and config["seed_everything"] == 7
    assert config["model"]["init_args"]["victim_arch"] == "small_cnn"
    trainer = config["trainer"]
    assert (trainer["max_epochs"], trainer["max_time"], trainer["default_root_dir"]) == (3, "00:01:30:30", "runs/x")


def test_a_stage_error_names_the_option_of_defend(tmp_path: Path) -> None:
    assert (
        in_defend_terms(
            "--data.init_args.source.init_args.test_root x overlaps --data.init_args.source.init_args.root y; "
            "--model.init_args.victim_arch; start over with --fresh true, or fit into another "
            "--trainer.default_root_dir."
        )
        == "--test-root x overlaps IMAGES y; --arch; start over with --fresh, or fit into another --out."
    )
    # Raised by the data source when the job is built, before anything trains.
    write_images(tmp_path / "images", 4)
    victim = write_victim_checkpoint(tmp_path / "victim.ckpt")
    with pytest.raises(ConfigError, match=r"^--class-names has 2 names but num_classes is 10: give one name per class"):
        main([str(victim), str(tmp_path / "images"), "--class-names", "a", "b", "--out", str(tmp_path / "run")])


# ---- one-line errors and the help ------------------------------------------------------------------------------------

BAD_INPUT = {
    "missing model": (["nothing.pt", "images"], r"MODEL nothing\.pt not found: pass the suspect model's file"),
    "model is a folder": (["images", "images"], r"MODEL images is a folder: pass the suspect model's file"),
    "IMAGES not a folder": (["suspect.pt", "nowhere"], r"IMAGES nowhere is not a folder: give the folder of your own"),
    "IMAGES empty": (["suspect.pt", "empty"], r"No image files under IMAGES empty \(jpg, png, .*\): give the folder"),
    "no architecture": (
        ["suspect.pt", "images"],
        r"suspect.pt holds bare weights without an architecture.*pass --arch",
    ),
    "unknown architecture": (["suspect.pt", "images", "--arch", "nosuch"], r"Unknown architecture 'nosuch'.*--arch pa"),
    "triggered without target": (
        ["suspect.pt", "images", "--triggered-root", "images"],
        r"--triggered-root needs --target-label: the triggered",
    ),
    "target without triggered": (["suspect.pt", "images", "--target-label", "0"], r"--target-label needs --triggered"),
    "test folder missing": (["suspect.pt", "images", "--test-root", "t"], r"--test-root t is not a folder: give the"),
    "no time": (["suspect.pt", "images", "--max-minutes", "0"], r"--max-minutes must be more than 0, got 0.0\.$"),
    "unknown option": (
        ["suspect.pt", "images", "--epochs", "3"],
        r"unrecognized arguments: --epochs 3: see `refine-pl",
    ),
    "no IMAGES": (["suspect.pt"], r"the following arguments are required: IMAGES: see `refine-pl defend --help`"),
}


@pytest.mark.parametrize("mistake", BAD_INPUT)
def test_bad_input_is_refused_in_one_line_before_anything_runs(
    mistake: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"weight": torch.zeros(2, 3, 3, 3)}, "suspect.pt")
    write_images(tmp_path / "images", 2)
    (tmp_path / "empty").mkdir()
    argv, message = BAD_INPUT[mistake]
    monkeypatch.setattr(sys, "argv", ["refine-pl", "defend", *argv])
    with pytest.raises(SystemExit) as stop:
        commands.run()
    line = str(stop.value.code)
    assert "\n" not in line and capsys.readouterr().err == ""
    assert re.match("refine-pl: error: " + message, line), line
    assert not (tmp_path / "runs").exists()


def test_the_help_of_refine_pl_names_defend_and_defends_help_is_the_quick_reference(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(sys, "argv", ["refine-pl", "--help"])
    with pytest.raises(SystemExit):
        commands.run()
    unwrapped = " ".join(re.sub(r"-\n\s*", "-", capsys.readouterr().out).split())  # argparse wraps at hyphens too
    assert "To defend your own model in one command: refine-pl defend MODEL IMAGES" in unwrapped
    monkeypatch.setattr(sys, "argv", ["refine-pl", "defend", "--help"])
    with pytest.raises(SystemExit):
        commands.run()
    printed = capsys.readouterr().out
    text = " ".join(printed.split())
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":  # every option says its default
            assert action.option_strings[0] in text and "(default: " in action.help, action.dest
    assert " + ".join(DEFEND_CONFIGS) in text  # the recipe it runs
    assert "-- --trainer.accelerator gpu" in text and "refine-pl test --config RUN/config.yaml --ckpt_path last" in text
    # The examples of the epilog are printed as they are, and each parses.
    assert USAGE_EXAMPLES in printed
    examples = [
        shlex.split(line) for line in USAGE_EXAMPLES.replace("\\\n", " ").splitlines() if "refine-pl def" in line
    ]
    assert len(examples) == 5
    for words in examples:
        build_parser().parse_args(words[2 : words.index("--") if "--" in words else None])


def documented_defend_commands() -> list[list[str]]:
    commands_found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"^```bash\n(.*?)^```", path.read_text(), flags=re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words[:2] == ["refine-pl", "defend"]:
                    commands_found.append([path.name, *words[2:]])
    return commands_found


def test_the_documents_show_defend_commands_that_parse() -> None:
    found = documented_defend_commands()
    assert {"README.md", "own-model.md"} <= {command[0] for command in found}
    for _, *argv in found:
        if "--" in argv:
            argv = argv[: argv.index("--")]
        build_parser().parse_args(argv)


# ---- whole runs ------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_defend_without_test_folders_fits_writes_the_defended_model_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    write_torchvision_model(tmp_path / "suspect.pt")
    write_images(tmp_path / "my_images", 12)
    command = ["suspect.pt", "my_images", "--arch", "mobilenet_v3_small", "--image-size", "32", "--max-epochs", "1",
               "--batch-size", "4", "--max-minutes", "30", "--", *SMALL_JOB, *WITHOUT_DEPLOYMENT_FORMATS]  # fmt: skip
    assert main(command) is None
    out = capsys.readouterr().out
    assert "Inferred --num-classes 4: classifier.3.weight [4, 1024] in suspect.pt" in out
    assert "Inferred --mean 0.485 0.456 0.406: ImageNet's" in out and "Inferred --image-size" not in out
    assert "Nothing was tested: give --test-root" in out
    run = tmp_path / "runs" / "defend_suspect"  # the default --out
    assert {"defended.safetensors", "MODEL_CARD.md", "config.yaml"} <= {p.name for p in run.iterdir()}
    assert not (run / "report.json").exists() and not (run / "predictions.csv").exists()
    description = read_description(run / "defended.safetensors")
    assert (description["num_classes"], description["in_channels"], description["image_size"]) == (4, 3, 32)
    assert description["victim_arch"] == "mobilenet_v3_small"
    assert description["mean"] == pytest.approx(IMAGENET["mean"]) and description["std"] == pytest.approx(
        IMAGENET["std"]
    )
    assert load_defended(run / "defended.safetensors")(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["trainer"]["max_time"] == "00:00:30:00" and config["trainer"]["max_epochs"] == 1

    # The same command again finds the run finished: it trains and writes no checkpoint.
    last = run / "checkpoints" / "last.ckpt"
    before = _sha256(last)
    main(command)
    assert _sha256(last) == before and len(list((run / "checkpoints").glob("*.ckpt"))) == 2
    # --fresh moves it aside and starts anew.
    main([*command[:1], "--fresh", *command[1:]])
    assert len(list((tmp_path / "runs").glob("defend_suspect.replaced-*"))) == 1 and last.is_file()


@pytest.mark.slow
def test_defend_with_test_folders_reports_and_its_config_repeats_the_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    write_torchvision_model(tmp_path / "suspect.pt")
    write_images(tmp_path / "my_images", 12)
    write_test_folder(tmp_path / "my_test", ["cat", "dog", "fox", "owl"])
    write_images(tmp_path / "my_triggered", 3, seed=20)
    report = main(
        ["suspect.pt", "my_images", "--arch", "mobilenet_v3_small", "--image-size", "32", "--max-epochs", "1",
         "--batch-size", "4", "--test-root", "my_test", "--triggered-root", "my_triggered", "--target-label", "0",
         "--predict", "--out", "run", "--", *SMALL_JOB, *WITHOUT_DEPLOYMENT_FORMATS]
    )  # fmt: skip
    run = tmp_path / "run"
    out = capsys.readouterr().out
    assert "| REFINE |" in out and "Repeat the test: refine-pl test --config run/config.yaml --ckpt_path last" in out
    written = json.loads((run / "report.json").read_text())
    assert written == report and report["test_images"] == {
        "clean": {"measured": 8, "of": 8}, "triggered": {"measured": 3, "of": 3}
    }  # fmt: skip
    for row in ("no_defense", "defended"):
        assert 0 <= report[row]["ba"] <= 1 and 0 <= report[row]["asr"] <= 1
    with (run / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and {row["defended_name"] for row in rows} <= {"cat", "dog", "fox", "owl"}

    (run / "report.json").unlink()
    cli_main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", "last"])
    assert json.loads((run / "report.json").read_text()) == report


@pytest.mark.slow
def test_defend_a_grayscale_model_reads_every_folder_in_one_channel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    write_grayscale_model(tmp_path / "digits.pt", num_classes=4)
    write_images(tmp_path / "scans", 12)  # RGB, RGBA, 8- and 16-bit grayscale files
    write_test_folder(tmp_path / "labeled", ["a", "b", "c", "d"])
    main(
        ["digits.pt", "scans", "--arch", "small_cnn", "--mean", "0.5", "--std", "0.25", "--max-epochs", "1",
         "--batch-size", "4", "--test-root", "labeled", "--predict", "--out", "run", "--", *SMALL_JOB]
    )  # fmt: skip
    assert "Inferred channels 1: 0.0.weight [32, 1, 3, 3] in digits.pt" in capsys.readouterr().out
    run = tmp_path / "run"
    description = read_description(run / "defended.safetensors")
    assert (description["in_channels"], description["image_size"], description["mean"]) == (
        1,
        28,
        [0.5],
    )  # exact in float32
    assert json.loads((run / "report.json").read_text())["test_images"]["clean"] == {"measured": 8, "of": 8}
    # The exported files take 1-channel images; the file alone predicts IMAGES as the run did.
    assert load_defended(run / "defended.safetensors")(torch.rand(3, 1, 28, 28)).shape == (3, 4)
    dims = onnx.load(str(run / "defended.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [1, 28, 28]
    assert torch.jit.load(str(run / "defended.torchscript.pt"))(torch.rand(2, 1, 28, 28)).shape == (2, 4)
    with (run / "predictions.csv").open(newline="") as handle:
        assert predict_folder(run / "defended.safetensors", "scans") == list(csv.DictReader(handle))
