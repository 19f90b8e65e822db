"""The SLURM example: script and config agree, and Lightning picks up ranks from SLURM as it does for any job."""

import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.strategies import DDPStrategy

from refine_pl.cli import cli_main
from refine_pl.configs import CONFIGS
from tests.conftest import REFINE_JOB

CLUSTER = CONFIGS / "cluster"
SBATCH = CLUSTER / "slurm_ddp.sbatch"
OVERLAY = CLUSTER / "slurm_ddp.yaml"


def _sbatch_option(name: str) -> int:
    (value,) = re.findall(rf"^#SBATCH --{name}=(\d+)$", SBATCH.read_text(), flags=re.MULTILINE)
    return int(value)


def test_batch_script_is_valid_bash_and_asks_slurm_for_what_the_config_uses() -> None:
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    trainer = yaml.safe_load(OVERLAY.read_text())["trainer"]
    assert _sbatch_option("nodes") == trainer["num_nodes"]
    assert _sbatch_option("ntasks-per-node") == trainer["devices"] == _sbatch_option("gpus-per-node")
    script = SBATCH.read_text()
    assert "srun refine-pl fit" in script and f"--config configs/cluster/{OVERLAY.name}" in script


def _slurm_task(monkeypatch: pytest.MonkeyPatch, rank: int, ntasks_per_node: int = 4, nodes: int = 2) -> None:
    """The environment srun gives task ``rank`` of the batch script."""
    for name, value in {
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NAME": "refine",
        "SLURM_NTASKS": ntasks_per_node * nodes,
        "SLURM_NTASKS_PER_NODE": ntasks_per_node,
        "SLURM_NNODES": nodes,
        "SLURM_NODELIST": "gpu-node[07-08]",
        "SLURM_PROCID": rank,
        "SLURM_LOCALID": rank % ntasks_per_node,
        "SLURM_NODEID": rank // ntasks_per_node,
    }.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # keeps the launcher off this process's threads


def _trainer_of_cluster_job(victim: Path, tmp_path: Path, *extra: str):
    cli = cli_main(
        [
            *REFINE_JOB, "--config", str(OVERLAY),
            "--model.init_args.victim_checkpoint", str(victim),
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.accelerator", "cpu",  # this machine has no GPU; everything else as on the cluster
            *extra,
        ],
        run=False,
    )  # fmt: skip
    return cli.trainer


def test_slurm_task_gets_its_rank_from_slurm(
    untrained_victim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _slurm_task(monkeypatch, rank=5)
    trainer = _trainer_of_cluster_job(untrained_victim, tmp_path)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size) == (2, 4, 8)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (5, 1, 1)
    assert trainer.strategy.cluster_environment.main_address == "gpu-node07"
    assert trainer.precision == "bf16-mixed"
    # The launcher checks SLURM's layout against devices / num_nodes, then runs the job in this task.
    assert trainer.strategy.launcher.launch(lambda: "launched") == "launched"


def test_devices_that_disagree_with_slurm_stop_the_job(
    untrained_victim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _slurm_task(monkeypatch, rank=0, ntasks_per_node=2)
    trainer = _trainer_of_cluster_job(untrained_victim, tmp_path)
    with pytest.raises(ValueError, match="You set `devices=4` in Lightning, but the number of tasks per node"):
        trainer.strategy.launcher.launch(lambda: "launched")
    trainer = _trainer_of_cluster_job(untrained_victim, tmp_path, "--trainer.devices", "2")  # the hint works
    assert trainer.world_size == 4 and trainer.strategy.launcher.launch(lambda: "launched") == "launched"
