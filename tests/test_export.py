"""Export of the defended classifier: the file rebuilds the exact model, holds no code, and bad files are refused."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from refine_pl.classifier import DefendedClassifier
from refine_pl.cli import cli_main
from refine_pl.errors import ConfigError
from refine_pl.export import export_defended, load_defended, read_description
from refine_pl.predict import main as predict_main
from tests.conftest import QUIET, REFINE_JOB, tiny_refine_module


def _trained_a_little(victim: Path):
    """A tiny REFINE module whose transform has moved away from its initial weights."""
    module = tiny_refine_module(victim, remap_seed=3)
    optimizer = torch.optim.SGD(module.transform.parameters(), lr=0.1)
    images = torch.rand(8, 1, 28, 28)
    for _ in range(2):
        optimizer.zero_grad()
        module.refine_loss(images)["loss"].backward()
        optimizer.step()
    return module.eval()


def test_exported_classifier_gives_the_same_logits_and_keeps_the_remap(victim_checkpoint: Path, tmp_path: Path) -> None:
    module = _trained_a_little(victim_checkpoint)
    path = export_defended(module.defended, 28, tmp_path / "defended.safetensors")
    loaded = load_defended(path)
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), module(images), rtol=0, atol=0)
    assert torch.equal(loaded.remap.permutation, module.remap.permutation)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    description = read_description(path)
    assert description["victim_arch"] == "small_cnn" and description["transform"] == {"base_width": 4, "depth": 4}
    assert description["mean"] == pytest.approx([0.1307]) and description["std"] == pytest.approx([0.3081])


def test_export_file_is_safetensors_with_tensors_only(untrained_victim: Path, tmp_path: Path) -> None:
    module = tiny_refine_module(untrained_victim)
    path = export_defended(module.defended, 28, tmp_path / "defended.safetensors")
    with safe_open(str(path), framework="pt") as file:
        keys = set(file.keys())
    assert keys == set(module.defended.state_dict())
    assert "remap.permutation" in keys
    # safetensors layout: an 8-byte header length, a JSON header, raw tensor bytes; no zip archive, no pickle.
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    assert set(header) == keys | {"__metadata__"}
    assert all(set(entry) == {"dtype", "shape", "data_offsets"} for name, entry in header.items() if name in keys)


def test_a_pickle_or_a_victim_file_is_refused_by_load_defended(untrained_victim: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "model.safetensors"
    torch.save({"weights": torch.zeros(2)}, pickled)
    with pytest.raises(ConfigError, match="is not a safetensors file"):
        load_defended(pickled)
    module = tiny_refine_module(untrained_victim)
    victim_only = tmp_path / "victim.safetensors"
    save_file({k: v.contiguous() for k, v in module.victim.state_dict().items()}, str(victim_only))
    with pytest.raises(ConfigError, match="is not a refine-pl defended classifier"):
        load_defended(victim_only)
    with pytest.raises(ConfigError, match="No defended classifier at"):
        load_defended(tmp_path / "missing.safetensors")


def test_export_refuses_a_transform_it_cannot_rebuild(untrained_victim: Path, tmp_path: Path) -> None:
    module = tiny_refine_module(untrained_victim)
    with pytest.raises(ConfigError, match="knows for refine_pl.transform.UNet only"):
        export_defended(
            DefendedClassifier(nn.Identity(), module.victim, module.remap), 28, tmp_path / "defended.safetensors"
        )


@pytest.mark.slow  # a CLI run or worker processes
def test_refine_config_exports_the_tested_classifier(victim_checkpoint: Path, tmp_path: Path) -> None:
    common = [
        *REFINE_JOB,
        "--model.init_args.victim_checkpoint", str(victim_checkpoint),
        "--model.init_args.transform.init_args.base_width", "4",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
        *QUIET,
    ]  # fmt: skip
    cli_main(["fit", *common])
    cli = cli_main(["test", *common, "--ckpt_path", "last", "--trainer.limit_test_batches", "1"])
    loaded = load_defended(tmp_path / "defended.safetensors")
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), cli.model.eval()(images), rtol=0, atol=0)


def test_weights_that_do_not_fit_the_recorded_modules_are_named(untrained_victim: Path, tmp_path: Path) -> None:
    module = tiny_refine_module(untrained_victim)
    path = export_defended(module.defended, 28, tmp_path / "defended.safetensors")
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys() if name != "remap.permutation"}  # noqa: SIM118
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ConfigError, match=r"do not fit its recorded modules: 1 keys missing .*remap\.permutation"):
        load_defended(path)


def _rewritten(path: Path, metadata_edit=None, tensor_edit=None) -> Path:
    """Rewrites the defended file at ``path`` with its description and tensors edited in place."""
    with safe_open(str(path), framework="pt") as file:
        description = json.loads(file.metadata()["refine_pl"])
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    if metadata_edit is not None:
        metadata_edit(description)
    if tensor_edit is not None:
        tensor_edit(tensors)
    save_file(tensors, str(path), metadata={"refine_pl": json.dumps(description)})
    return path


@pytest.fixture
def defended_file(untrained_victim: Path, tmp_path: Path) -> Path:
    module = tiny_refine_module(untrained_victim)
    return export_defended(module.defended, 28, tmp_path / "defended.safetensors")


@pytest.mark.parametrize(
    ("permutation", "message"),
    [
        (torch.zeros(10, dtype=torch.long), "not a permutation of the 10 classes"),
        (torch.arange(10), r"leaves classes \[0, 1, 2, 3, 4\] in place"),
        (torch.arange(1, 11), "not a permutation"),  # out of range: 10 is not a class
        (torch.tensor([1, 0, 3, 2, 5, 4, 7, 6, 9, 8]).int(), "dtype torch.int32"),
        (torch.tensor([1, 2, 0, 4, 3, 6, 5, 8, 9, 7])[None], r"remap\.permutation: file \[1, 10\], model \[10\]"),
        (torch.tensor([0, 2, 1, 4, 3, 6, 5, 8, 9, 7]), r"leaves classes \[0\] in place"),
    ],
)
def test_a_remap_that_is_not_a_derangement_is_refused(defended_file: Path, permutation: Tensor, message: str) -> None:
    _rewritten(defended_file, tensor_edit=lambda tensors: tensors.update({"remap.permutation": permutation}))
    with pytest.raises(ConfigError, match=message):
        load_defended(defended_file)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(defended_file: Path, value: float) -> None:
    def poison(tensors: dict[str, Tensor]) -> None:
        tensors["transform.head.weight"][0, 0, 0, 0] = value

    _rewritten(defended_file, tensor_edit=poison)
    with pytest.raises(ConfigError, match=r"NaN or infinite values in transform\.head\.weight"):
        load_defended(defended_file)


def test_a_billion_classes_are_refused_before_anything_is_built(
    defended_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _rewritten(defended_file, metadata_edit=lambda description: description.update(num_classes=10**9))

    def must_not_build(*args, **kwargs):
        raise AssertionError("a module was built from metadata that had not been checked")

    monkeypatch.setattr("refine_pl.export.build_architecture", must_not_build)
    monkeypatch.setattr("refine_pl.export.UNet", must_not_build)
    monkeypatch.setattr("refine_pl.export.OutputRemap", must_not_build)
    with pytest.raises(ConfigError, match=r"num_classes=1000000000, which is not an integer in \[2, 100000\]"):
        load_defended(defended_file)
    with pytest.raises(ConfigError, match="num_classes=1000000000"):
        read_description(defended_file)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"num_classes": 1e1}, r"num_classes=10\.0, which is not an integer"),
        ({"num_classes": True}, r"num_classes=True, which is not an integer"),
        ({"in_channels": 0}, r"in_channels=0, which is not an integer in \[1, 64\]"),
        ({"image_size": 10**6}, r"image_size=1000000, which is not an integer in \[1, 4096\]"),
        ({"mean": [0.1, 0.2, 0.3]}, r"mean=\[0\.1, 0\.2, 0\.3\], which is not 1 number"),
        ({"std": [0.0]}, r"std=\[0\.0\], which is not 1 number\(s\) in \[0\.001, 100\]"),
        ({"std": [1e-300]}, r"std=\[1e-300\], which is not 1 number\(s\) in \[0\.001, 100\] \(one per channel\)"),
        ({"mean": [1e308]}, r"mean=\[1e\+308\], which is not 1 number\(s\) in \[-10, 10\]"),
        ({"mean": [float("nan")]}, r"mean=\[nan\], which is not"),
        ({"mean": "0.1"}, r"mean='0\.1'"),
        ({"victim_arch": "resnet9000"}, r"architecture 'resnet9000', which this refine-pl does not know"),
        ({"victim_arch": ["small_cnn"]}, r"architecture \['small_cnn'\]"),
        ({"transform": {"base_width": 4, "depth": 99}}, r"transform\.depth=99, which is not an integer in \[1, 8\]"),
        ({"transform": {"base_width": 4}}, r"expected the keys base_width and depth"),
        ({"extra": 1}, r"metadata keys .*'extra'.*expected"),
    ],
)
def test_metadata_is_checked_before_building(defended_file: Path, edit: dict, message: str) -> None:
    _rewritten(defended_file, metadata_edit=lambda description: description.update(edit))
    with pytest.raises(ConfigError, match=message) as error:
        load_defended(defended_file)
    assert "\n" not in str(error.value)


def test_metadata_that_lies_about_the_weights_is_caught_on_the_meta_device(defended_file: Path) -> None:
    _rewritten(defended_file, metadata_edit=lambda description: description.update(num_classes=20))
    with pytest.raises(ConfigError, match=r"do not fit its recorded modules: .*size mismatch"):
        load_defended(defended_file)
    _rewritten(defended_file, metadata_edit=lambda description: description["transform"].update(base_width=1024))
    with pytest.raises(ConfigError, match=r"do not fit its recorded modules"):
        load_defended(defended_file)


def test_metadata_that_is_not_json_is_refused(defended_file: Path) -> None:
    with safe_open(str(defended_file), framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    save_file(tensors, str(defended_file), metadata={"refine_pl": "{not json"})
    with pytest.raises(ConfigError, match="damaged refine-pl metadata"):
        load_defended(defended_file)


def test_metadata_nested_too_deeply_for_the_parser_is_one_error(defended_file: Path) -> None:
    with safe_open(str(defended_file), framework="pt") as file:
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    save_file(tensors, str(defended_file), metadata={"refine_pl": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(ConfigError, match=r"damaged refine-pl metadata \(nested too deeply\)") as error:
        load_defended(defended_file)
    assert "\n" not in str(error.value)


def test_one_nan_image_cannot_silently_become_class_0(defended_file: Path) -> None:
    model = load_defended(defended_file)
    images = torch.rand(4, 1, 28, 28)
    images[2, 0, 5, 5] = float("nan")
    with torch.no_grad():  # unchecked, the NaN image's logits are NaN and argmax calls them class 0
        unchecked = model.remap(model.victim(model.transform(images)))
    assert unchecked[2].isnan().all() and int(unchecked.argmax(1)[2]) == 0
    with pytest.raises(ConfigError, match=r"defended classifier's input has 1 NaN or infinite pixel value"):
        model(images)
    images[2, 0, 5, 5] = float("inf")
    with pytest.raises(ConfigError, match="NaN or infinite"):
        model(images)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ((torch.rand(2, 1, 28, 28) * 255).to(torch.uint8), r"dtype torch\.uint8.*convert with images\.float\(\) / 255"),
        (torch.rand(2, 1, 28, 28) * 255, r"outside \[0, 1\]: 0-255 pixels must be divided by 255"),
        ((torch.rand(2, 1, 28, 28) - 0.1307) / 0.3081, r"outside \[0, 1\]: pass images in \[0, 1\], not normalised"),
    ],
)
def test_defended_classifier_says_how_to_fix_its_input(defended_file: Path, images: Tensor, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_defended(defended_file)(images)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((2, 1, 8, 8), r"takes images \[B, 1, 28, 28\] .*shape \(2, 1, 8, 8\): resize them to 28x28"),
        ((2, 1, 56, 56), r"shape \(2, 1, 56, 56\): resize them to 28x28"),
        ((2, 1, 28, 100), r"shape \(2, 1, 28, 100\): resize them to 28x28"),
        ((2, 3, 28, 28), r"shape \(2, 3, 28, 28\): read the images with 1 channel\(s\)\.$"),
        ((1, 28, 28), r"shape \(1, 28, 28\): pass a batch \[B, C, H, W\]"),
    ],
)
def test_a_loaded_defended_model_takes_only_the_recorded_image_shape(
    defended_file: Path, shape: tuple[int, ...], message: str
) -> None:
    model = load_defended(defended_file)
    with pytest.raises(ConfigError, match=message) as error:
        model(torch.rand(shape))
    assert "\n" not in str(error.value) and "in_channels" not in str(error.value)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_a_file_of_format_version_1_still_loads_with_the_defaults_it_implies(defended_file: Path) -> None:
    def as_version_1(description: dict) -> None:
        del description["class_names"], description["crop"]
        description["format"] = "refine-pl-defended-classifier/1"

    _rewritten(defended_file, metadata_edit=as_version_1)
    description = read_description(defended_file)
    assert description["class_names"] is None and description["crop"] is True
    assert load_defended(defended_file)(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"class_names": ["a"] * 9}, "class_names that are not 10 strings"),
        ({"class_names": ["x" * 201] * 10}, "of at most 200 characters"),
        ({"crop": "yes"}, "crop='yes', not true or false"),
        ({"victim_arch": "os:system"}, r"import path 'os:system'; refine-pl never imports code named by a file"),
    ],
)
def test_class_names_crop_and_import_paths_in_a_file_are_checked(defended_file: Path, edit: dict, message: str) -> None:
    _rewritten(defended_file, metadata_edit=lambda description: description.update(edit))
    with pytest.raises(ConfigError, match=message):
        load_defended(defended_file)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("{model}", r"--output .*defended\.safetensors is the defended model file"),
        ("{images}/b/two.png", r"--output .*two\.png is one of the images to classify"),
        ("{images}", r"--output .* is a directory: name a CSV file"),
        ("{model}/p.csv", r"--output .*p\.csv lies under .*defended\.safetensors, which is a file"),
    ],
)
def test_predict_refuses_an_output_it_would_destroy_or_cannot_write_before_predicting(
    defended_file: Path, tmp_path: Path, output: str, message: str
) -> None:
    images = tmp_path / "images"
    for name in ("a/one.png", "b/two.png"):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (28, 28), 128).save(images / name)
    before = {path: path.read_bytes() for path in (defended_file, images / "b/two.png")}
    output = output.format(model=defended_file, images=images)
    with pytest.raises(ConfigError, match=message) as error:
        predict_main([str(defended_file), str(images), "--output", output])
    assert "\n" not in str(error.value)
    assert {path: path.read_bytes() for path in before} == before
    with pytest.raises(ConfigError, match=r"--batch-size 0 is not a number of images: pass 1 or more"):
        predict_main([str(defended_file), str(images), "--output", str(tmp_path / "p.csv"), "--batch-size", "0"])
    assert not (tmp_path / "p.csv").exists()
    predict_main([str(defended_file), str(images), "--output", str(images / "predictions.csv")])
    assert len((images / "predictions.csv").read_text().splitlines()) == 3


def test_a_defended_file_or_a_defense_checkpoint_given_as_the_victim_is_named_for_what_it_is(
    untrained_victim: Path, defended_file: Path, tmp_path: Path
) -> None:
    module = tiny_refine_module(untrained_victim)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "refine.ckpt")
    for path, message in (
        (defended_file, r"is a defended classifier exported by refine-pl .*not a suspect model: pass "
         r"--model\.init_args\.victim_checkpoint the model it was defended from"),
        (tmp_path / "refine.ckpt", rf"is a checkpoint of a refine-pl defense \(trained in front of the victim "
         rf"{untrained_victim}\), not a suspect model: pass --model\.init_args\.victim_checkpoint that victim, and "
         r"this file with --ckpt_path"),
    ):  # fmt: skip
        for arch in (None, "small_cnn"):
            with pytest.raises(ConfigError, match=message) as error:
                tiny_refine_module(path, victim_arch=arch)
            assert "bare weights" not in str(error.value) and "\n" not in str(error.value)
