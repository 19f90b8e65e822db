"""benchmarks/lc_sweep.py: its chosen variant is configs/attacks/lc.yaml; it never reuses a run of other settings."""

from pathlib import Path

import pytest
import yaml

from benchmarks import lc_sweep
from benchmarks.victims import attack_config


def test_the_chosen_variant_is_the_attack_config() -> None:
    config = yaml.safe_load(Path(attack_config("lc")).read_text())["data"]["init_args"]["attack"]["init_args"]
    chosen = lc_sweep.variant_arguments("e16_r095_a05")
    assert {key: chosen[key] for key in config} == config
    assert all(value == lc_sweep.variant_arguments("config")[key] for key, value in chosen.items() if key not in config)


def test_a_finished_run_of_other_settings_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "lc_ts6_s100"
    folder.mkdir()
    recorded = {**lc_sweep.variant_arguments("config"), "seed": 100}  # the base, not ts6
    (folder / "config.yaml").write_text(yaml.safe_dump({"data": {"init_args": {"attack": {"init_args": recorded}}}}))
    with pytest.raises(SystemExit, match="other LC settings"):
        lc_sweep.variant_row(tmp_path, "ts6", 100)
    assert lc_sweep.recorded_arguments(folder) == lc_sweep.variant_arguments("config")
