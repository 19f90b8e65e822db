"""Each behaviour of Lightning, jsonargparse and torch that refine_pl.internals relies on, checked by name."""

import io
import operator
import os
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentError, ArgumentParser
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.trainer.states import RunningStage
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from datamodules import RefineDataModule
from datamodules.sampling import ResumableDataLoader, ResumableSampler
from refine_pl.cli import RefineCLI, cli_main
from refine_pl.errors import ConfigError
from refine_pl.internals import (
    archive_record,
    archive_records,
    aten_operator,
    batches_done_in_epoch,
    config_error_cause,
    global_seed,
    message_without_worker_traceback,
    native_bf16,
    parse_failure,
    unrepeated_sampler,
)
from tests.conftest import QUIET, REFINE_JOB, SmallDigits, quiet_trainer, tiny_refine_module


def test_seed_everything_exports_the_seed_that_global_seed_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert global_seed() == 0
    seed_everything(1234)
    assert os.environ["PL_GLOBAL_SEED"] == "1234" and global_seed() == 1234


def test_lightning_keeps_the_resumable_sampler_in_a_distributed_run_and_replaces_a_plain_one() -> None:
    trainer = Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False, enable_progress_bar=False)
    dataset = TensorDataset(torch.arange(40))
    ours = ResumableDataLoader(dataset, ResumableSampler(dataset, batch_size=4, seed=0, num_replicas=2, rank=1))
    plain = DataLoader(dataset, batch_size=4, sampler=RandomSampler(dataset))
    connector = trainer._data_connector
    assert not connector._requires_distributed_sampler(ours)
    assert connector._requires_distributed_sampler(plain)
    prepared = connector._prepare_dataloader(ours, shuffle=True, mode=RunningStage.TRAINING)
    assert prepared.sampler is ours.sampler


def test_the_training_loop_counts_batches_done_in_the_epoch(untrained_victim: Path, tmp_path: Path) -> None:
    counts = []
    module = tiny_refine_module(untrained_victim)
    original = module.on_train_batch_end

    def record(*args, **kwargs) -> None:
        counts.append(batches_done_in_epoch(module.trainer))
        original(*args, **kwargs)

    module.on_train_batch_end = record
    data = RefineDataModule(SmallDigits(), batch_size=16, augment=False)  # 90 images: 5 batches an epoch
    quiet_trainer(tmp_path, max_steps=7, limit_val_batches=0, enable_checkpointing=False).fit(module, datamodule=data)
    assert counts == [1, 2, 3, 4, 5, 1, 2]


def test_the_unrepeated_sampler_gives_every_sample_to_exactly_one_process() -> None:
    dataset = TensorDataset(torch.arange(11))
    shares = [list(unrepeated_sampler(dataset, world_size=3, rank=rank)) for rank in range(3)]
    assert sorted(index for share in shares for index in share) == list(range(11))


def test_a_config_error_raised_by_a_constructor_is_found_behind_jsonargparse(tmp_path: Path) -> None:
    args = ["fit", *REFINE_JOB, "--model.init_args.victim_checkpoint", str(tmp_path / "missing.ckpt"), *QUIET]
    with pytest.raises(ConfigError, match="Victim weights not found"):
        cli_main(args)  # RefineCLI re-raises the cause; without it jsonargparse's ValueError would surface
    wrapped = ValueError("Problem with given class_path 'refine_pl.RefineLitModule'")
    wrapped.__cause__ = RuntimeError("while instantiating")
    wrapped.__cause__.__cause__ = ConfigError("the message")
    assert str(config_error_cause(wrapped)) == "the message"
    assert config_error_cause(ValueError("unrelated")) is None


class _FailingDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        raise ConfigError("Cannot read image x.png: replace it.")


@pytest.mark.slow  # a CLI run or worker processes
def test_an_error_of_a_dataloader_worker_keeps_its_type_and_ends_with_its_message() -> None:
    loader = DataLoader(_FailingDataset(), num_workers=1)
    with pytest.raises(ConfigError) as raised:
        next(iter(loader))
    assert "Original Traceback" in str(raised.value)
    assert message_without_worker_traceback(str(raised.value)) == "Cannot read image x.png: replace it."
    assert message_without_worker_traceback("plain message") == "plain message"


def test_lightning_cli_still_merges_checkpoint_hyper_parameters_where_refine_cli_turns_it_off() -> None:
    assert RefineCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path
    assert "_parse_ckpt_path" in LightningCLI.__init__.__code__.co_names


def test_torchs_archive_reader_lists_and_reads_the_records_every_torch_loader_reads(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"weight": torch.arange(3.0)}, buffer)
    data = buffer.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:  # a zip archive whose records sit under one root folder
        expected = {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}
    records = archive_records(data)
    assert records == {name: len(content) for name, content in expected.items()} and "data.pkl" in records
    assert all(archive_record(data, name) == content for name, content in expected.items())
    assert archive_records(b"PK\x03\x04 not an archive") is None


def test_an_exported_graph_calls_aten_operator_overloads() -> None:
    program = torch.export.export(torch.nn.ReLU(), (torch.rand(2),))
    calls = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert [aten_operator(target) for target in calls] == ["relu"]
    assert aten_operator(operator.getitem) is None and aten_operator(torch.ops.prims.add.default) is None


def test_a_callback_argument_on_the_command_line_reaches_the_last_callback_of_the_config(
    capsys: pytest.CaptureFixture,
) -> None:
    """What tests.conftest.WITHOUT_DEPLOYMENT_FORMATS relies on: DeploymentFiles is the recipe's last callback."""
    with pytest.raises(SystemExit):
        cli_main(["fit", *REFINE_JOB, "--print_config"])
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert callbacks[-1] == {"class_path": "callbacks.DeploymentFiles", "init_args": {"formats": []}}
    assert all("formats" not in callback.get("init_args", {}) for callback in callbacks[:-1])


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU flags the Linux kernel reports")
def test_native_bf16_on_cpu_agrees_with_the_cpu_flags() -> None:
    flags = {flag for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
             for flag in line.split(":", 1)[1].split()}  # fmt: skip
    assert native_bf16(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert not native_bf16(torch.device("meta"))


def test_jsonargparse_chains_a_parse_error_down_to_the_refused_key_and_its_reason() -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--trainer.max_epochs", type=int | None)
    with pytest.raises(ArgumentError) as refused:
        parser.parse_args(["--trainer.max_epochs", "many"])
    failure = parse_failure(refused.value)
    assert failure.keys == ["trainer.max_epochs"] and failure.reason.startswith("Expected a int") and not failure.syntax
