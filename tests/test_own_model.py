"""The test that plays the user of docs/own-model.md's walk-through by hand (its one command, ``refine-pl defend``,
is tests/test_defend.py's).

A torchvision model that is not a ResNet (MobileNetV3-small) saved as a bare state_dict, a flat folder of the
user's unlabeled PNG and JPEG files (mixed sizes, grayscale and RGBA among them), labeled test images and triggered
images; then the page's own YAML file and commands, run as a user runs them (the console commands, in a fresh
process, from the user's folder), and its onnxruntime snippet. What comes out is checked: the report, one prediction
per image, the exported file's predictions equal to the run's, ONNX and TorchScript equal to PyTorch, and the model
card.
"""

import configparser
import csv
import hashlib
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import get_model

from refine_pl.export import load_defended, read_description
from tests.conftest import REPO
from tests.test_unlabeled_folder import write_images

COMMANDS = {
    "refine-pl": [sys.executable, "-m", "refine_pl"],
    "refine-pl-predict": [sys.executable, "-m", "refine_pl.predict"],
}
"""What the console commands run (checked against setup.cfg below), as the test runs them: from this checkout."""

SMALL_RUN = [
    "--trainer.max_steps", "2",
    "--data.init_args.source.init_args.image_size", "32",
    "--data.init_args.batch_size", "4",
    "--data.init_args.num_workers", "0",
    "--model.init_args.transform.init_args.base_width", "4",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip
"""Added to every `refine-pl` command of the section: a few steps on 32 px images instead of the 224 px recipe."""

ONNX_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
"""How close onnxruntime's logits (CPU, float32) must be to PyTorch's: the two run the same float32 graph, with
operators fused and reordered differently."""


BY_HAND = "## The same job by hand, or extended"
"""The heading of the page's LightningCLI walk-through, which this test plays: the page from there on."""


def walkthrough() -> str:
    text = (REPO / "docs" / "own-model.md").read_text()
    return text[text.index(BY_HAND) :]


def section_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", walkthrough(), flags=re.S | re.M)


def section_commands() -> list[list[str]]:
    """The commands of the section's shell blocks, continuations joined."""
    commands = []
    for block in section_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_the_console_commands_are_the_entry_points_of_train_py_pipeline_py_and_the_file_predictor() -> None:
    """``refine-pl`` is refine_pl.commands:run, which runs ``defend`` or else the LightningCLI (refine_pl.cli)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    scripts = dict(
        line.replace(" ", "").split("=")
        for line in config["options.entry_points"]["console_scripts"].split("\n")
        if line
    )
    assert scripts == {
        "refine-pl": "refine_pl.commands:run",
        "refine-pl-pipeline": "refine_pl.pipeline:run",
        "refine-pl-predict": "refine_pl.predict:run",
    }
    for script, module in (("train.py", "refine_pl.commands"), ("pipeline.py", "refine_pl.pipeline")):
        assert f"from {module} import" in (REPO / script).read_text() and "    run()" in (REPO / script).read_text()
    assert "from refine_pl.commands import run" in (REPO / "refine_pl" / "__main__.py").read_text()
    assert {words[0] for words in section_commands()} <= set(COMMANDS)


def _write_the_users_files(folder: Path) -> None:
    torch.manual_seed(0)
    model = get_model("mobilenet_v3_small", num_classes=4)
    with torch.no_grad():  # a model whose classes differ between images (at its initialisation they barely do)
        model.classifier[-1].weight.mul_(300)
    torch.save(model.state_dict(), folder / "suspect.pt")
    write_images(folder / "my_images", 11, seed=1, nested=False)
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)).save(folder / "my_images" / "photo.jpg")
    for label, name in enumerate(["cat", "dog", "fox", "owl"]):
        write_images(folder / "my_test" / name, 2, seed=10 + label, nested=False)
    write_images(folder / "my_triggered", 3, seed=20, nested=False)
    (folder / "my_job.yaml").write_text(section_blocks("yaml")[0])


def _run(command: list[str], folder: Path) -> str:
    program, *args = command
    if program == "refine-pl":
        args = [*args, *SMALL_RUN]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [*COMMANDS[program], *args], cwd=folder, env=environment, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_a_user_defends_their_own_torchvision_model_with_the_walkthrough(tmp_path: Path) -> None:
    import onnxruntime

    _write_the_users_files(tmp_path)
    commands = section_commands()
    assert [words[:2] for words in commands] == [
        ["refine-pl", "fit"], ["refine-pl", "test"], ["refine-pl", "predict"],
        ["refine-pl-predict", "runs/suspect/defended.safetensors"],
    ]  # fmt: skip
    for command in commands:
        _run(command, tmp_path)
    run = tmp_path / "runs" / "suspect"

    # test: BA on the labeled test folder and ASR on the triggered one, for the victim alone and defended.
    report = json.loads((run / "report.json").read_text())
    assert report["dataset"] == "unlabeled_folder" and report["attack"] is None
    for row in ("no_defense", "defended"):
        assert 0 <= report[row]["ba"] <= 1 and 0 <= report[row]["asr"] <= 1

    # predict: one row per image of the folder, named classes; the exported file alone predicts the same.
    rows = _csv(run / "predictions.csv")
    images = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "my_images").iterdir())
    assert [row["path"] for row in rows] == images and len(rows) == 12
    assert set(rows[0]) == {
        "path", "defended_class", "defended_probability", "victim_class", "disagree", "score", "flagged",
        "defended_name", "victim_name",
    }  # fmt: skip
    names = ["cat", "dog", "fox", "owl"]
    assert all(row["defended_name"] == names[int(row["defended_class"])] for row in rows)
    assert len({row["victim_class"] for row in rows}) > 1  # the victim's classes differ: a real model, not a constant
    assert _csv(run / "file_predictions.csv") == rows

    # export: ONNX (onnxruntime, CPU) and TorchScript give PyTorch's logits, with a dynamic batch.
    defended = load_defended(run / "defended.safetensors")
    session = onnxruntime.InferenceSession(str(run / "defended.onnx"), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(run / "defended.torchscript.pt"))
    for batch in (1, 7):
        batch_images = torch.rand(batch, 3, 32, 32)
        with torch.no_grad():
            expected = defended(batch_images)
            torch.testing.assert_close(scripted(batch_images), expected, **ONNX_TOLERANCE)
        onnx_logits = session.run(["logits"], {"images": batch_images.numpy()})[0]
        np.testing.assert_allclose(onnx_logits, expected.numpy(), **ONNX_TOLERANCE)

    # The walk-through's onnxruntime snippet, run as it is: it classifies photo.jpg as predict did.
    (snippet,) = [block for block in section_blocks("python") if "import onnxruntime" in block]
    printed = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    photo = next(row for row in rows if row["path"] == "my_images/photo.jpg")
    assert printed.strip() == f"defended class: {photo['defended_class']}"

    # The model card beside the files.
    card = (run / "MODEL_CARD.md").read_text()
    description = read_description(run / "defended.safetensors")
    assert description["victim_arch"] == "mobilenet_v3_small" and description["class_names"] == names
    assert hashlib.sha256((tmp_path / "suspect.pt").read_bytes()).hexdigest() in card
    assert (
        "Architecture: `mobilenet_v3_small`" in card
        and "Trained on 11 images from `my_images`, unlabeled; 1 more held out" in card
    )
    assert "BA on 8 labeled test images from `my_test`; ASR on 3 triggered test images" in card
    permutation = defended.remap.permutation.tolist()
    assert f"drawn from seed 0 (victim class c becomes class permutation[c], permutation {permutation})" in card
    assert f"torch {importlib.metadata.version('torch')}" in card and "onnxruntime" in card and "| REFINE |" in card
    for name in ("defended.safetensors", "defended.onnx", "defended.torchscript.pt"):
        assert hashlib.sha256((run / name).read_bytes()).hexdigest() in card
