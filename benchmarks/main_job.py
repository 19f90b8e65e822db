"""The main job as a user runs it, measured: wall clock, peak memory and its report, for README.md's figures.

Runs :func:`refine_pl.pipeline.main` (``python pipeline.py``) with its defaults in a fresh run folder and writes
``main_job.json`` to ``--results-dir``, the record :func:`benchmarks.render.main_job` and
:func:`benchmarks.render.main_job_cost` render:

- ``job``: the command and the machine (CPU model and cores, torch threads, ``OMP_NUM_THREADS``, ``--conditions``);
- ``wall_clock_s``: seconds from the start of the job to its report;
- ``peak_memory_gb``: peak resident memory in GB (10^9 bytes), ``getrusage``'s ``ru_maxrss`` of this process plus
  that of its largest finished child (data-loader workers, spawned processes);
- ``no_defense``, ``defended``, ``clean_floor``, ``label_free``: the rows of the job's ``report.json`` and its
  label-free agreement, as it wrote them.

Arguments it does not know go to the pipeline unchanged (``--victim-arg``, ``--refine-arg``, ...)::

    python benchmarks/main_job.py --conditions "nothing else running"
"""

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/main_job.py` from the root

from benchmarks.speed import cpu_model
from benchmarks.victims import REPO
from refine_pl import pipeline
from refine_pl.console import exit_on_config_error
from refine_pl.errors import ConfigError
from refine_pl.metric_names import LABEL_FREE, REPORT_ROWS

RESULT = "main_job.json"


def peak_memory_gb() -> float:
    """Peak resident memory so far of this process plus its largest finished child, in GB (Linux: KiB counts)."""
    kib = sum(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return kib * 1024 / 1e9


def job_description(pipeline_args: list[str], conditions: str) -> str:
    """The command and the machine it ran on, as ``main_job.json``'s ``job``."""
    command = " ".join(["python pipeline.py", *pipeline_args]) if pipeline_args else "python pipeline.py (defaults)"
    machine = (
        f"on {cpu_model()} ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    return ", ".join([command, machine, *([conditions] if conditions else [])])


def measure(run_dir: Path, pipeline_args: list[str], conditions: str = "") -> dict[str, Any]:
    """Runs the main job in the fresh folder ``run_dir`` with ``pipeline_args``; returns the ``main_job.json`` record.

    Raises:
        ConfigError: ``run_dir`` holds files: the job would resume a run and measure only what was left of it.
    """
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"{run_dir} is not empty: the main job is measured in a fresh run folder; pass another --run-dir."
        )
    start = time.perf_counter()
    pipeline.main(["--run-dir", str(run_dir), *pipeline_args])
    wall_clock = time.perf_counter() - start
    report = json.loads((run_dir / "report.json").read_text())
    return {
        "job": job_description(pipeline_args, conditions),
        "wall_clock_s": round(wall_clock, 1),
        "peak_memory_gb": round(peak_memory_gb(), 2),
        **{row.key: report[row.key] for row in REPORT_ROWS},
        LABEL_FREE: report.get(LABEL_FREE),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measures the main job with the command line ``argv`` (``sys.argv[1:]`` when None); returns the record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "main_job", help="a fresh run folder")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--conditions", default="", help="what else ran on the machine, for the record")
    args, pipeline_args = parser.parse_known_args(argv)
    record = measure(args.run_dir, pipeline_args, args.conditions)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / RESULT).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    exit_on_config_error(main)
