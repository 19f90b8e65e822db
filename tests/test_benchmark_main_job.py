"""benchmarks/main_job.py: the main job's record holds its run's report and the machine, in the shape render reads."""

import json
from pathlib import Path

import pytest

from benchmarks import main_job, render
from refine_pl.errors import ConfigError
from refine_pl.metric_names import LABEL_FREE, REPORT_ROWS

TINY = [
    "--victim-arg=--trainer.max_epochs=1",
    "--victim-arg=--trainer.limit_train_batches=3",
    "--refine-arg=--trainer.max_epochs=1",
    "--refine-arg=--trainer.limit_train_batches=2",
    "--refine-arg=--trainer.limit_val_batches=0",
    "--refine-arg=--model.init_args.transform.init_args.base_width=4",
    "--refine-arg=--trainer.callbacks.init_args.formats=[]",  # no ONNX / TorchScript files
]


@pytest.mark.slow
def test_a_tiny_main_job_writes_its_report_rows_and_its_cost(tmp_path: Path) -> None:
    run_dir, results = tmp_path / "run", tmp_path / "results"
    record = main_job.main(["--run-dir", str(run_dir), "--results-dir", str(results), "--conditions", "a test", *TINY])
    written = json.loads((results / "main_job.json").read_text())
    assert written == record
    assert set(written) == {"job", "wall_clock_s", "peak_memory_gb", LABEL_FREE, *(row.key for row in REPORT_ROWS)}
    assert written[LABEL_FREE] is None  # no validation in the tiny job: nothing held out was measured
    report = json.loads((run_dir / "report.json").read_text())
    assert all(written[row.key] == report[row.key] for row in REPORT_ROWS)
    assert (run_dir / "victim" / "checkpoints").is_dir() and (run_dir / "clean" / "checkpoints").is_dir()
    assert written["wall_clock_s"] > 0 and written["peak_memory_gb"] > 0
    assert "torch thread(s), OMP_NUM_THREADS=" in written["job"] and written["job"].endswith("a test")
    assert "--refine-arg=--trainer.max_epochs=1" in written["job"]
    assert "| REFINE |" in render.main_job(results) and "wall clock" in render.main_job_cost(results)


def test_a_run_folder_that_holds_a_run_is_refused(tmp_path: Path) -> None:
    (tmp_path / "victim").mkdir()
    with pytest.raises(ConfigError, match="not empty: the main job is measured in a fresh run folder"):
        main_job.main(["--run-dir", str(tmp_path), "--results-dir", str(tmp_path / "results")])
    assert not (tmp_path / "results").exists()
