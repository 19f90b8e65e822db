"""A run folder knows what it was started with and who writes into it: a fit resumed with other settings, a second
fit started while one runs, and a pipeline re-run with other configs are refused in one line naming the way out.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pytorch_lightning import Callback, LightningModule, Trainer

from refine_pl.cli import cli_main
from refine_pl.errors import ConfigError
from refine_pl.pipeline import main, parse_args, record_job
from refine_pl.run_folder import LOCK, run_lock
from tests.conftest import QUIET, REFINE_JOB, REPO

TINY = [
    "--model.init_args.transform.init_args.base_width", "4",
    "--data.init_args.batch_size", "16",
    "--trainer.limit_train_batches", "2",
    "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "1",
    "--trainer.max_epochs", "1",
    *QUIET,
]  # fmt: skip


class WaitForFile(Callback):
    """Holds a fit at its start until ``path`` exists, so a test can act while the fit runs."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        deadline = time.monotonic() + 300
        while not self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)


def _fit(victim: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit", *REFINE_JOB, "--model.init_args.victim_checkpoint", str(victim),
        "--trainer.default_root_dir", str(root), *TINY, *extra,
    ]  # fmt: skip


def _wait_for(path: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)


@pytest.mark.slow  # CLI runs
def test_a_fit_resumed_with_other_settings_is_refused_and_fresh_starts_over(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    cli_main(_fit(victim_checkpoint, run))
    assert json.loads((run / "run.json").read_text())["data"]["init_args"]["batch_size"] == 16
    first = (run / "checkpoints" / "last.ckpt").read_bytes()

    with pytest.raises(ConfigError, match=r"holds a run started with data\.init_args\.batch_size 16, not 8 .*--fresh"):
        cli_main(_fit(victim_checkpoint, run, "--data.init_args.batch_size", "8", "--ckpt_path", "last"))
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == first
    assert not (run / LOCK).exists()  # released by the refused fit

    cli_main(_fit(victim_checkpoint, run, "--data.init_args.batch_size", "8", "--fresh", "true"))
    (moved,) = tmp_path.glob("run.replaced-*")
    assert (moved / "checkpoints" / "last.ckpt").read_bytes() == first  # nothing deleted
    assert json.loads((run / "run.json").read_text())["data"]["init_args"]["batch_size"] == 8


@pytest.mark.slow  # two training processes
def test_a_second_fit_into_a_folder_in_use_refuses_in_one_line_and_the_first_ends_intact(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    run, go = tmp_path / "run", tmp_path / "go"
    held = ["--trainer.callbacks+=tests.test_run_folder.WaitForFile", f"--trainer.callbacks.path={go}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "train.py", *_fit(victim_checkpoint, run, *held)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(run / LOCK, first)
        second = subprocess.run(
            [sys.executable, "train.py", *_fit(victim_checkpoint, run, "--data.init_args.batch_size", "8")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        go.touch()
        _, first_err = first.communicate(timeout=300)
    assert second.returncode == 1
    assert "Traceback" not in second.stderr
    errors = [line for line in second.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"refine-pl: error: {run} is in use by process {first.pid} on {socket.gethostname()} (its lock "
                      f"{run / LOCK}): wait for that job to end, or run in another folder "
                      "(--trainer.default_root_dir)."]  # fmt: skip
    assert first.returncode == 0, first_err
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert json.loads((run / "run.json").read_text())["data"]["init_args"]["batch_size"] == 16
    assert "batch_size: 16" in (run / "config.yaml").read_text()
    assert not (run / LOCK).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(f"{socket.gethostname()} {dead.pid}\n")
    with pytest.warns(UserWarning, match=f"Taking over .*{LOCK}"), run_lock(tmp_path):
        assert (tmp_path / LOCK).read_text().split()[1] == str(os.getpid())
    assert not (tmp_path / LOCK).exists()


def test_a_lock_held_by_a_live_process_is_refused(tmp_path: Path) -> None:
    (tmp_path / LOCK).write_text(f"{socket.gethostname()} {os.getppid()}\n")
    with pytest.raises(ConfigError, match=f"{tmp_path} is in use by process {os.getppid()}"), run_lock(tmp_path):
        pass
    assert (tmp_path / LOCK).exists()  # not ours to remove


def test_the_pipeline_rerun_with_another_attack_is_refused_before_any_stage_and_fresh_starts_over(
    tmp_path: Path,
) -> None:
    run = tmp_path / "job"
    record_job(parse_args(["--run-dir", str(run), "--victim-arg=--trainer.max_epochs=1"]))
    (run / "victim").mkdir()
    other = ["--run-dir", str(run), "--victim-config", "configs/victim/mnist.yaml", "configs/attacks/blended.yaml"]
    with pytest.raises(
        ConfigError, match=r"job holds a run started with victim_config \[.*badnets.yaml'\], not .*--fresh"
    ):
        main([*other, "--victim-arg=--trainer.max_epochs=1"])  # refused before the first stage trains anything
    with pytest.raises(ConfigError, match=r"started with victim_arg \['--trainer.max_epochs=1'\], not \[\]"):
        main(["--run-dir", str(run)])
    assert sorted(path.name for path in run.iterdir()) == ["pipeline.json", "victim"]

    record_job(parse_args([*other, "--fresh"]))
    (moved,) = tmp_path.glob("job.replaced-*")
    assert (moved / "victim").is_dir()
    assert json.loads((run / "pipeline.json").read_text())["victim_config"][1] == "configs/attacks/blended.yaml"


@pytest.mark.slow  # CLI runs
def test_a_finished_run_resumed_with_more_epochs_is_refused_not_trained_at_rate_zero(
    victim_checkpoint: Path, tmp_path: Path
) -> None:
    cli_main(_fit(victim_checkpoint, tmp_path))  # the MNIST job's WarmupCosineLR ends at max_epochs: 1
    last = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    longer = _fit(victim_checkpoint, tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", "last")
    with pytest.raises(ConfigError, match=r"decays to 0 at epoch 1, .* resume with --trainer.max_epochs 1, or train 3"):
        cli_main(longer)
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == last
    assert not (tmp_path / LOCK).exists()
