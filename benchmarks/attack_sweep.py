"""The sweep that chose the label-consistent attack's settings on the embedded MNIST-5k (``configs/attacks/lc.yaml``).

Every variant is a victim trained with ``configs/victim/mnist.yaml`` and the LC attack at the variant's settings
(written out in full here, so a variant means the same whatever the config file says), tested on the 1,000
held-out images; a clean model of the same seed gives the BA to compare with. The seeds are tuning seeds (100 and
up), not the seeds of the attacks table. A real backdoor needs victim ASR >= 0.80 and victim BA at most 2 points
below the clean model's, in every seed. Results: ``lc_sweep.csv`` (a row per variant and seed) and ``lc_sweep.md``
in ``--results-dir``. Finished runs are reused after checking that they were trained with the variant's settings.

    python benchmarks/lc_sweep.py                      # every variant (about an hour here)
    python benchmarks/lc_sweep.py --variants config e16_r095_a05
"""

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/lc_sweep.py` from the root

from benchmarks.victims import QUIET, REPO, VICTIM_CONFIG, attack_config
from refine_pl.attacks import LabelConsistent
from refine_pl.cli import cli_main
from refine_pl.pipeline import config_flags, resume_flag

MIN_ASR, MAX_BA_GAP = 0.80, 0.02
BASE = {"poison_rate": 0.09, "epsilon": 0.3, "pgd_steps": 20, "surrogate_epochs": 5, "trigger_size": 4}
"""The settings before the sweep: 90 % of the target class, PGD radius 0.3, the trigger at full amplitude."""
NO_PERTURBATION = 0.004  # rounds to a perturbation of at most 1/255
VARIANTS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    # name: (settings that differ from BASE, seeds)
    "config": ({}, (100, 101)),
    "nopert": ({"epsilon": NO_PERTURBATION}, (100,)),
    "ts6": ({"trigger_size": 6}, (100, 101)),
    "ts8": ({"trigger_size": 8}, (100,)),
    "sur12": ({"surrogate_epochs": 12}, (100, 101)),
    "pgd50": ({"pgd_steps": 50}, (100, 101)),
    "rob10": ({"surrogate_epsilon": 0.1, "surrogate_epochs": 10, "pgd_steps": 40}, (100, 101)),
    "rob20": ({"surrogate_epsilon": 0.2, "surrogate_epochs": 10, "pgd_steps": 40}, (100, 101)),
    "r10_ts6": ({"poison_rate": 0.1, "trigger_size": 6}, (100, 101)),
    "np_r10_ts4": ({"epsilon": NO_PERTURBATION, "poison_rate": 0.1}, (100, 101)),
    "np_r10_ts6": ({"epsilon": NO_PERTURBATION, "poison_rate": 0.1, "trigger_size": 6}, (100, 101)),
    "e10_r10_ts6": ({"epsilon": 0.1, "poison_rate": 0.1, "trigger_size": 6}, (100, 101)),
    "np_r097_ts4": ({"epsilon": NO_PERTURBATION, "poison_rate": 0.097}, (100, 101)),
    "a025": ({"trigger_amplitude": 0.25}, (100,)),
    "np_a05": ({"epsilon": NO_PERTURBATION, "trigger_amplitude": 0.5}, (100, 101)),
    "np_a075": ({"epsilon": NO_PERTURBATION, "trigger_amplitude": 0.75}, (100, 101)),
    "np_r10_a05_ts4": ({"epsilon": NO_PERTURBATION, "poison_rate": 0.1, "trigger_amplitude": 0.5}, (100, 101)),
    "np_r10_a025_ts4": ({"epsilon": NO_PERTURBATION, "poison_rate": 0.1, "trigger_amplitude": 0.25}, (100,)),
    "np_r10_a01": ({"epsilon": NO_PERTURBATION, "poison_rate": 0.1, "trigger_amplitude": 0.1}, (100, 101)),
    "np_r10_a007": ({"epsilon": NO_PERTURBATION, "poison_rate": 0.1, "trigger_amplitude": 0.07}, (100, 101)),
    "np_r10_a005": ({"epsilon": NO_PERTURBATION, "poison_rate": 0.1, "trigger_amplitude": 0.05}, (100, 101, 102, 103)),
    "r10_a005": ({"poison_rate": 0.1, "trigger_amplitude": 0.05}, (100, 101)),
    "np_r095_a05": ({"epsilon": NO_PERTURBATION, "poison_rate": 0.095, "trigger_amplitude": 0.5}, (100, 101, 102)),
    "np_r095_a035": ({"epsilon": NO_PERTURBATION, "poison_rate": 0.095, "trigger_amplitude": 0.35}, (100, 101, 102)),
    "np_r097_a05": ({"epsilon": NO_PERTURBATION, "poison_rate": 0.097, "trigger_amplitude": 0.5}, (100, 101, 102)),
    "e16_r0925_a05": ({"epsilon": 0.0627, "poison_rate": 0.0925, "trigger_amplitude": 0.5}, (100, 101, 102)),
    "e16_r095_a04": ({"epsilon": 0.0627, "poison_rate": 0.095, "trigger_amplitude": 0.4}, (100, 101, 102)),
    "e16_r095_a05": ({"epsilon": 0.0627, "poison_rate": 0.095, "trigger_amplitude": 0.5}, (100, 101, 102, 103, 104)),
}  # fmt: skip
"""The variants in the order they were tried; ``e16_r095_a05`` is configs/attacks/lc.yaml."""


def variant_arguments(name: str) -> dict[str, Any]:
    """The LC constructor arguments of variant ``name`` (target class 0), every one written out."""
    attack = LabelConsistent(target_label=0, **{**BASE, **VARIANTS[name][0]})
    return {key: value for key, value in attack.spec()["init_args"].items() if key != "seed"}


def recorded_arguments(folder: Path) -> dict[str, Any] | None:
    """The LC arguments a finished run in ``folder`` was trained with (defaults for arguments it predates)."""
    config = folder / "config.yaml"
    if not config.is_file():
        return None
    recorded = yaml.safe_load(config.read_text())["data"]["init_args"]["attack"]["init_args"]
    full = {**LabelConsistent(target_label=0).spec()["init_args"], **recorded}
    return {key: value for key, value in full.items() if key != "seed"}


def victim_figures(folder: Path, configs: list[str], seed: int, arguments: list[str]) -> dict[str, float]:
    """Test BA (and ASR when there is an attack) of the victim job in ``folder`` (trained now or found finished)."""
    result = folder / "result.json"
    if not result.is_file():
        common = [
            *config_flags(configs), "--trainer.default_root_dir", str(folder), *QUIET, "--seed_everything", str(seed),
            *arguments,
        ]  # fmt: skip
        cli_main(["fit", *common, *resume_flag(folder)])
        metrics = cli_main(["test", *common, "--ckpt_path", "last"]).trainer.callback_metrics
        figures = {"test_ba": float(metrics["test/ba"])}
        if "test/asr" in metrics:
            figures["test_asr"] = float(metrics["test/asr"])
        result.write_text(json.dumps(figures) + "\n")
    return json.loads(result.read_text())


def variant_row(run_dir: Path, name: str, seed: int) -> dict[str, Any]:
    """Clean BA, victim BA and ASR of variant ``name`` at ``seed``."""
    folder = run_dir / f"lc_{name}_s{seed}"
    expected = variant_arguments(name)
    recorded = recorded_arguments(folder)
    if recorded is not None and recorded != expected:
        raise SystemExit(f"{folder} was trained with other LC settings ({recorded}); move it away or use --run-dir.")
    attack = [f"--data.init_args.attack.init_args.{key}={json.dumps(value)}" for key, value in expected.items()]
    attack.append(f"--data.init_args.attack.init_args.seed={seed}")
    clean = victim_figures(run_dir / f"clean_s{seed}", [VICTIM_CONFIG], seed, [])
    victim = victim_figures(folder, [VICTIM_CONFIG, attack_config("lc")], seed, attack)
    return {
        "variant": name, "seed": seed, "clean_ba": clean["test_ba"], "victim_ba": victim["test_ba"],
        "victim_asr": victim["test_asr"],
    }  # fmt: skip


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Per variant: its settings, the seeds, the victim ASR and BA gap to the clean model of each seed, the verdict."""
    lines = [
        "| variant | settings (besides the base) | seeds | victim ASR per seed | BA gap to clean per seed "
        "| real backdoor |",
        "|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["variant"] for r in rows):
        group = [r for r in rows if r["variant"] == name]
        gaps = [r["clean_ba"] - r["victim_ba"] for r in group]
        real = all(r["victim_asr"] >= MIN_ASR for r in group) and max(gaps) <= MAX_BA_GAP
        settings = ", ".join(f"{k}={v}" for k, v in VARIANTS[name][0].items()) or "(the base)"
        seeds = " ".join(str(r["seed"]) for r in group)
        asrs = " / ".join(f"{r['victim_asr']:.3f}" for r in group)
        lines.append(
            f"| {name} | {settings} | {seeds} | {asrs} | {' / '.join(f'{g:+.3f}' for g in gaps)} | "
            f"{'yes' if real else 'no'} |"
        )
    base = ", ".join(f"{k}={v}" for k, v in BASE.items())
    return "\n".join(
        [
            *lines,
            "",
            f"Base: LC with target class 0, {base}, trigger_amplitude=1.0, a standard surrogate; epsilon="
            f"{NO_PERTURBATION} is no perturbation (at most 1/255). Victim: configs/victim/mnist.yaml (small CNN, 12 "
            "epochs). Test BA / ASR on the 1,000 held-out images; BA gap: clean model of the same seed minus victim. "
            f"real backdoor: victim ASR >= {MIN_ASR} and BA gap <= {MAX_BA_GAP} in every seed.",
        ]
    )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the sweep with the command line ``argv``; returns the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "lc_sweep")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [variant_row(args.run_dir, name, seed) for name in args.variants for seed in VARIANTS[name][1]]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    with (args.results_dir / "lc_sweep.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    table = markdown_table(rows)
    (args.results_dir / "lc_sweep.md").write_text(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    main()
