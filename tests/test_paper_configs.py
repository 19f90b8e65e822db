"""The paper's settings as a user types them: every dataset config and every victim architecture runs a
victim fit and a REFINE fit through the CLI, on tiny files in the real on-disk formats.
"""

from pathlib import Path

import pytest
import torch

from refine_pl.architectures import build_architecture
from refine_pl.cli import cli_main
from refine_pl.console import exit_on_config_error
from refine_pl.errors import ConfigError
from refine_pl.export import load_defended
from refine_pl.pipeline import config_flags
from tests.conftest import BADNETS_CONFIG, QUIET, WITHOUT_DEPLOYMENT_FORMATS
from tests.dataset_files import write_cifar10, write_gtsrb, write_image_folder

pytestmark = pytest.mark.slow  # every test here trains through the CLI on files written to disk

SOURCE = "--data.init_args.source.init_args"
TINY = ["--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0", *QUIET]
# The image-folder tree has 3 classes; the ImageNet-subset configs expect 50 unless told otherwise.
FOLDER_ARGS = [f"{SOURCE}.num_classes", "3"]
PAPER_SETTINGS = {
    # dataset: (files written by, extra arguments, image size, channels of the first U-Net stage)
    "cifar10": (write_cifar10, [], 32, 64),
    "gtsrb": (write_gtsrb, [], 32, 64),
    "imagenet50": (write_image_folder, [*FOLDER_ARGS, "--data.init_args.attack.init_args.patch_size", "20"], 224, 32),
}


def _configs(kind: str, dataset: str) -> list[str]:
    """The ``--config`` flags of a dataset's victim job, or of its REFINE job (the reference recipe first, without
    the ONNX and TorchScript files).
    """
    configs = [f"configs/{kind}/{dataset}.yaml"]
    if kind == "refine":
        configs.insert(0, "configs/refine/reference.yaml")
        return [*config_flags(configs), *WITHOUT_DEPLOYMENT_FORMATS]
    return config_flags(configs)


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    roots = {}
    for dataset, (write, *_) in PAPER_SETTINGS.items():
        roots[dataset] = tmp_path_factory.mktemp(dataset)
        write(roots[dataset])
    return roots


@pytest.mark.parametrize("dataset", PAPER_SETTINGS)
def test_paper_setting_trains_a_victim_then_refine(dataset: str, data_roots: dict[str, Path], tmp_path: Path) -> None:
    _, extra, size, width = PAPER_SETTINGS[dataset]
    data = [f"{SOURCE}.root", str(data_roots[dataset]), *TINY, *extra]
    victim = cli_main(
        ["fit", *_configs("victim", dataset), "--config", BADNETS_CONFIG, *data, "--trainer.fast_dev_run", "true",
         "--trainer.default_root_dir", str(tmp_path / "victim")]
    )  # fmt: skip
    assert victim.trainer.global_step == 1
    assert {"val/ba", "val/asr"} <= set(victim.trainer.logged_metrics)
    assert victim.model.hparams.image_size == size and victim.model.hparams.in_channels == 3
    torch.testing.assert_close(victim.model.model.mean.flatten(), torch.tensor(victim.datamodule.source.mean))
    checkpoint = tmp_path / "victim.ckpt"  # fast_dev_run writes none; save it as the checkpoint callback would
    victim.trainer.save_checkpoint(checkpoint)

    refine_data = [arg for arg in data if "patch_size" not in arg and arg != "20"]  # the attack comes from the victim
    refine = cli_main(
        ["fit", *_configs("refine", dataset), *refine_data, "--model.init_args.victim_checkpoint", str(checkpoint),
         "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path / "refine")]
    )  # fmt: skip
    assert refine.trainer.global_step == 1
    assert refine.model.transform.stem[0].out_channels == width  # the paper's U-Net width for this size
    attack = refine.datamodule.attack
    assert attack.name == "badnets" and attack.patch_size == (20 if dataset == "imagenet50" else 3)
    scheduler = refine.trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR) and scheduler.gamma == 0.8
    assert sorted(scheduler.milestones) == [100, 130]


ARCHITECTURES = {
    # architecture: (dataset config whose files it runs on, extra arguments)
    "resnet50_cifar": ("cifar10", []),
    "vgg16_bn_cifar": ("cifar10", []),
    "resnet50": ("imagenet50", FOLDER_ARGS),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_architecture_runs_victim_and_refine_fits_at_its_native_size(
    arch: str, data_roots: dict[str, Path], tmp_path: Path
) -> None:
    dataset, extra = ARCHITECTURES[arch]
    data = [f"{SOURCE}.root", str(data_roots[dataset]), *TINY, *extra, "--data.init_args.batch_size", "2"]
    run = ["--trainer.fast_dev_run", "true"]
    victim = cli_main(
        ["fit", *_configs("victim", dataset), "--model.init_args.arch", arch, *data, *run,
         "--trainer.default_root_dir", str(tmp_path / "victim")]
    )  # fmt: skip
    assert victim.trainer.global_step == 1
    # A user's own bare weights of this architecture, saved from DDP.
    size, classes = victim.model.hparams.image_size, victim.model.hparams.num_classes
    weights = tmp_path / "suspect.pt"
    state = build_architecture(arch, classes, 3).state_dict()
    torch.save({f"module.{key}": value for key, value in state.items()}, weights)
    refine = cli_main(
        ["fit", *_configs("refine", dataset), *data, "--model.init_args.victim_checkpoint", str(weights),
         "--model.init_args.victim_arch", arch, "--model.init_args.transform.init_args.base_width", "8", *run,
         "--trainer.default_root_dir", str(tmp_path / "refine")]
    )  # fmt: skip
    assert refine.trainer.global_step == 1 and refine.datamodule.attack is None
    # The config's export rebuilds this architecture, U-Net and normalisation from the file alone.
    exported = load_defended(tmp_path / "refine" / "defended.safetensors")
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(exported(images), refine.model.eval()(images), rtol=0, atol=0)


def test_missing_dataset_stops_the_cli_with_the_flag_and_the_path(tmp_path: Path) -> None:
    args = ["fit", *_configs("victim", "cifar10"), f"{SOURCE}.root", str(tmp_path / "nowhere"), *TINY]
    with pytest.raises(ConfigError, match=f"CIFAR-10 not found under {tmp_path / 'nowhere'} .*download is off"):
        cli_main([*args, "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path)])


def test_a_corrupted_image_read_by_a_worker_ends_the_job_with_one_line(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    for path in (tmp_path / "data" / "train").rglob("*.JPEG"):
        path.write_bytes(b"not an image")
    args = ["fit", *_configs("victim", "imagenet50"), f"{SOURCE}.root", str(tmp_path / "data"), *FOLDER_ARGS, *QUIET,
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "1", "--data.init_args.val_fraction",
            "0.5", "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path / "run")]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        exit_on_config_error(lambda: cli_main(args))
    message = str(stop.value.code)
    assert message.startswith(f"refine-pl: error: Cannot read image {tmp_path / 'data' / 'train'}")
    assert ".JPEG (cannot identify image file" in message and "\n" not in message and "Traceback" not in message
