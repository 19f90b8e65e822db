"""A run's checkpoints: the report and export always describe the final weights, every epoch can be resumed, no
command silently evaluates untrained weights or trains over a run, and a killed run resumes exactly.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from callbacks import ExportDefendedClassifier, RunCheckpoint
from datamodules import RefineDataModule
from refine_pl.checkpoints import newest_complete_checkpoint
from refine_pl.cli import cli_main
from refine_pl.errors import ConfigError
from tests.conftest import QUIET, REFINE_JOB, REPO, CodeOnUnpickle, SmallDigits, quiet_trainer, tiny_refine_module

TINY = [
    "--model.init_args.transform.init_args.base_width", "4",
    "--data.init_args.batch_size", "16",
    "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "2",
    *QUIET,
]  # fmt: skip


def _job(victim: Path, root: Path) -> list[str]:
    return [*REFINE_JOB, "--model.init_args.victim_checkpoint", str(victim), "--trainer.default_root_dir", str(root)]


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.slow  # a CLI run or worker processes
def test_a_fit_that_ends_between_validations_reports_and_exports_its_final_weights(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    # 7 epochs, validation every 5: Lightning's own ModelCheckpoint would leave last.ckpt at epoch 5.
    fit = ["fit", *_job(victim_checkpoint, tmp_path), *TINY, "--trainer.max_epochs", "7"]
    trained = cli_main([*fit, "--trainer.check_val_every_n_epoch", "5"]).model
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 14  # 7 epochs of 2 steps
    for name, value in trained.state_dict().items():
        if not name.startswith(("victim.", "defended.victim.")):  # the frozen victim is named, not saved
            assert torch.equal(_state(last)[name], value), name

    test = ["test", *_job(victim_checkpoint, tmp_path), *TINY, "--ckpt_path", "last"]
    tested = cli_main(test)
    assert tested.trainer.ckpt_path == str(last)
    exported = (tmp_path / "defended.safetensors").read_bytes()
    report = (tmp_path / "report.json").read_text()
    files = {path: path.read_bytes() for path in (tmp_path / "checkpoints").iterdir()}

    # Running the finished job again, as pipeline.py does, changes nothing.
    cli_main([*fit, "--trainer.check_val_every_n_epoch", "5", "--ckpt_path", "last"])
    cli_main(test)
    assert (tmp_path / "defended.safetensors").read_bytes() == exported
    assert (tmp_path / "report.json").read_text() == report
    assert {path: path.read_bytes() for path in (tmp_path / "checkpoints").iterdir()} == files


def test_every_epoch_and_every_n_steps_leave_a_resumable_checkpoint(untrained_victim: Path, tmp_path: Path) -> None:
    checkpoint = RunCheckpoint(every_n_train_steps=3)
    saved = []
    save = checkpoint._save_checkpoint

    def recording_save(trainer, path: str) -> None:
        saved.append((trainer.global_step, Path(path).name))
        save(trainer, path)

    checkpoint._save_checkpoint = recording_save
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=4, limit_val_batches=0, callbacks=[checkpoint])
    trainer.fit(tiny_refine_module(untrained_victim), datamodule=RefineDataModule(SmallDigits(), batch_size=16))
    assert [step for step, name in saved if name == "last.ckpt"] == [3, 4, 6, 8]
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["epoch=1-step=8.ckpt", "last.ckpt"]


def test_commands_that_would_use_untrained_weights_or_train_over_a_run_are_refused(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    job = _job(victim_checkpoint, tmp_path)
    with pytest.raises(ConfigError, match=r"--ckpt_path last: no complete checkpoint in .*checkpoints"):
        cli_main(["test", *job, *TINY, "--ckpt_path", "last"])
    cli_main(["fit", *job, *TINY, "--trainer.max_epochs", "1"])
    exported = (tmp_path / "defended.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="`test` without --ckpt_path would use untrained weights: pass --ckpt_path"):
        cli_main(["test", *job, *TINY])
    with pytest.raises(ConfigError, match=r"already holds a run \(.*last.ckpt.*\): resume it with --ckpt_path last"):
        cli_main(["fit", *job, *TINY, "--trainer.max_epochs", "2"])
    assert (tmp_path / "defended.safetensors").read_bytes() == exported and not (tmp_path / "report.json").exists()

    # From Python too: testing a module that was never trained or restored writes nothing.
    trainer = quiet_trainer(tmp_path, callbacks=[ExportDefendedClassifier()], limit_test_batches=1)
    data = RefineDataModule(SmallDigits(), batch_size=16)
    with pytest.raises(ConfigError, match="Refusing to write defended.safetensors for untrained weights"):
        trainer.test(tiny_refine_module(victim_checkpoint), datamodule=data)
    assert (tmp_path / "defended.safetensors").read_bytes() == exported


def _bad_checkpoints(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    files = {name: folder / f"{name}.ckpt" for name in ("empty", "truncated", "state_dict", "pickle", "safetensors")}
    files["empty"].touch()
    torch.save({"conv.weight": torch.zeros(2)}, files["state_dict"])
    torch.save({"state_dict": {}, "global_step": 1, "extra": CodeOnUnpickle(folder / "code_ran")}, files["pickle"])
    save_file({"weight": torch.zeros(2)}, str(files["safetensors"]))
    files["folder"] = folder
    return files


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("empty", "is empty \\(0 bytes\\)"),
        ("truncated", "is truncated or corrupt"),
        ("state_dict", "is not a training checkpoint of a refine-pl run"),
        ("pickle", "Refusing to load .*could run code"),
        ("safetensors", "is a safetensors file, not a training checkpoint"),
        ("folder", "is a folder: pass a .ckpt file in it"),
    ],
)
def test_an_unreadable_ckpt_path_gives_one_line_and_offers_the_newest_complete_checkpoint(
    victim_checkpoint: Path, tmp_path: Path, name: str, message: str
) -> None:
    job = _job(victim_checkpoint, tmp_path / "run")
    cli_main(["fit", *job, *TINY, "--trainer.max_epochs", "1"])
    files = _bad_checkpoints(tmp_path / "bad")
    complete = tmp_path / "run" / "checkpoints" / "last.ckpt"
    files["truncated"].write_bytes(complete.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=message) as refused:
        cli_main(["test", *job, *TINY, "--ckpt_path", str(files[name])])
    text = str(refused.value)
    assert "\n" not in text and "weights_only=False" not in text and not (tmp_path / "bad" / "code_ran").exists()
    assert text.endswith(f"The newest complete checkpoint of this run is {complete}: pass it, or `last`.")


def test_last_skips_a_truncated_last_ckpt_for_the_newest_complete_checkpoint(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    job = _job(victim_checkpoint, tmp_path)
    cli_main(["fit", *job, *TINY, "--trainer.max_epochs", "2"])
    last, epoch_file = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / "epoch=1-step=4.ckpt"
    assert newest_complete_checkpoint(tmp_path) == (last, {})
    last.write_bytes(last.read_bytes()[:5000])
    newest, unreadable = newest_complete_checkpoint(tmp_path)
    assert newest == epoch_file and list(unreadable) == [last]
    with pytest.warns(UserWarning, match=f"Skipping {last}: .*truncated.* Resuming from {epoch_file}"):
        tested = cli_main(["test", *job, *TINY, "--ckpt_path", "last"])
    assert tested.trainer.ckpt_path == str(epoch_file)


SUBPROCESS_RUN = [
    "--model.init_args.transform.init_args.base_width", "4",
    "--data.init_args.batch_size", "16",
    "--trainer.limit_train_batches", "4",
    "--trainer.limit_val_batches", "0",
    "--trainer.max_epochs", "3",
    *QUIET,
]  # fmt: skip


def _train(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, *(["-m", "tests.fault_injection", fault] if fault else ["train.py"]), "fit", *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(victim_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The final checkpoint of the subprocess run that no fault interrupts."""
    root = tmp_path_factory.mktemp("uninterrupted")
    run = _train([*_job(victim_checkpoint, root), *SUBPROCESS_RUN])
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "resumes_from"),
    [
        ("step:6", "last.ckpt"),  # mid-epoch: the epoch-end checkpoint before it (step 4)
        ("write:3", "last.ckpt"),  # half of epoch=1-step=8.ckpt written: last.ckpt (step 4) is the newest complete
        ("write:4", "epoch=1-step=8.ckpt"),  # half of last.ckpt (step 8) written over the complete step-4 one
        ("before-last:2", "epoch=1-step=8.ckpt"),  # killed between the step-8 epoch file and its last.ckpt
    ],
)
def test_a_killed_training_process_resumes_from_the_newest_complete_checkpoint_and_ends_as_an_uninterrupted_run(
    victim_checkpoint: Path, tmp_path: Path, uninterrupted: dict, fault: str, resumes_from: str
) -> None:
    job = [*_job(victim_checkpoint, tmp_path / "killed"), *SUBPROCESS_RUN]
    killed = _train(job, fault)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert newest_complete_checkpoint(tmp_path / "killed")[0].name == resumes_from
    # The resume runs in this process, on one thread as the subprocesses do, so that its arithmetic is theirs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = cli_main(["fit", *job, "--ckpt_path", "last"])
    finally:
        torch.set_num_threads(threads)
    assert resumed.trainer.ckpt_path == str(tmp_path / "killed" / "checkpoints" / resumes_from)

    final = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)
    reference = uninterrupted
    assert final["global_step"] == reference["global_step"] == 12
    for name, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][name], value), name
    for state, expected in zip(
        final["optimizer_states"][0]["state"].values(), reference["optimizer_states"][0]["state"].values(), strict=True
    ):
        assert torch.equal(state["momentum_buffer"], expected["momentum_buffer"])


def test_a_moved_run_folder_is_tested_with_the_victim_the_command_names(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    original = tmp_path / "original"
    (original / "victim").mkdir(parents=True)
    victim = original / "victim" / "last.ckpt"
    victim.write_bytes(victim_checkpoint.read_bytes())
    cli_main(["fit", *_job(victim, original), *TINY, "--trainer.max_epochs", "1"])
    moved = tmp_path / "moved"
    original.rename(moved)  # the checkpoint still records the victim at its old path, which is gone
    checkpoint = moved / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["victim"]["path"] == str(victim)
    tested = cli_main(["test", *_job(moved / "victim" / "last.ckpt", moved), *TINY, "--ckpt_path", str(checkpoint)])
    assert tested.model.victim_record.path == str(moved / "victim" / "last.ckpt")
    assert (moved / "report.json").is_file()


def test_ckpt_path_best_is_refused_in_one_line_before_anything_is_built(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--ckpt_path best: a refine-pl run monitors no metric.*pass last"):
        cli_main(["test", *_job(tmp_path / "no_victim.ckpt", tmp_path), "--ckpt_path", "best"])


@pytest.mark.slow
def test_a_partial_test_says_so_and_never_replaces_a_full_tests_report_or_card(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    job = [
        *_job(victim_checkpoint, tmp_path), *QUIET,
        "--model.init_args.transform.init_args.base_width", "4",
        "--data.init_args.batch_size", "16",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "0",
    ]  # fmt: skip
    cli_main(["fit", *job, "--trainer.max_epochs", "1"])
    with pytest.warns(UserWarning, match=r"Partial test.*Written to .*report\.json"):  # no full report yet
        cli_main(["test", *job, "--ckpt_path", "last", "--trainer.limit_test_batches", "2"])
    first = json.loads((tmp_path / "report.json").read_text())
    assert first["test_images"]["clean"]["measured"] == 32 < first["test_images"]["clean"]["of"]
    assert (tmp_path / "report.md").read_text().startswith("**Partial test** (32 of ")

    cli_main(["test", *job, "--ckpt_path", "last"])  # the full test replaces the partial one
    full = json.loads((tmp_path / "report.json").read_text())
    assert all(images["measured"] == images["of"] > 0 for images in full["test_images"].values())
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "**Partial test**" not in card and f"BA on {full['test_images']['clean']['of']} labeled" in card

    with pytest.warns(UserWarning, match=r"Partial test.*Written to .*report\.partial\.json, beside the full test"):
        cli_main(["test", *job, "--ckpt_path", "last", "--trainer.limit_test_batches", "2"])
    assert json.loads((tmp_path / "report.json").read_text()) == full
    assert (tmp_path / "MODEL_CARD.md").read_text() == card
    partial = json.loads((tmp_path / "report.partial.json").read_text())
    assert partial["test_images"]["triggered"]["measured"] == 32
    assert (tmp_path / "report.partial.md").read_text().startswith("**Partial test**")
    assert "BA on 32 labeled" in (tmp_path / "MODEL_CARD.partial.md").read_text()


@pytest.mark.parametrize(
    ("root", "message"),
    [
        ("afile", r"default_root_dir .*afile is a file: pass a folder"),
        ("afile/run", r"default_root_dir .*afile/run lies under the file .*afile: pass a folder"),
        ("with_file", r"with_file/checkpoints is a file, where the run keeps its checkpoints"),
        ("locked", r"locked cannot be written into: pass a folder you can write to"),
    ],
)
def test_a_run_folder_that_cannot_hold_the_run_is_refused_in_one_line_before_anything_is_built(
    root: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "afile").touch()
    (tmp_path / "with_file").mkdir()
    (tmp_path / "with_file" / "checkpoints").touch()
    (tmp_path / "locked").mkdir()
    writable = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).name != "locked" and writable(path, mode))
    with pytest.raises(ConfigError, match=message):  # the victim file does not exist: nothing was built
        cli_main(["fit", *_job(tmp_path / "no_victim.ckpt", tmp_path / root), *TINY])
    assert (tmp_path / "afile").read_bytes() == b"" and not (tmp_path / "locked" / "run.lock").exists()
