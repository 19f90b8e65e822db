"""benchmarks/attack_sweep.py: each chosen variant is its attack's config; it never reuses a run of other settings."""

from pathlib import Path

import pytest
import yaml

from benchmarks import attack_sweep
from benchmarks.victims import attack_config
from refine_pl.configs import resolve_config


@pytest.mark.parametrize("attack", sorted(attack_sweep.SWEEPS))
def test_the_chosen_variant_is_the_attack_config(attack: str) -> None:
    content = yaml.safe_load(Path(resolve_config(attack_config(attack))).read_text())
    config = content["data"]["init_args"]["attack"]["init_args"]
    sweep = attack_sweep.SWEEPS[attack]
    chosen = attack_sweep.variant_arguments(attack, sweep.chosen)
    assert {key: chosen[key] for key in config} == config
    # every argument the config leaves out is the constructor's default
    defaults = attack_sweep.ATTACKS[attack](target_label=0).spec()["init_args"]
    assert all(value == defaults[key] for key, value in chosen.items() if key not in config)
    epochs = sweep.variants[sweep.chosen].epochs
    assert epochs is None or content["trainer"]["max_epochs"] == epochs


def _record(folder: Path, arguments: dict, epochs: int) -> None:
    folder.mkdir()
    content = {"trainer": {"max_epochs": epochs}, "data": {"init_args": {"attack": {"init_args": arguments}}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(content))


def test_a_finished_run_of_other_settings_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "lc_ts6_s100"
    _record(folder, {**attack_sweep.variant_arguments("lc", "config"), "seed": 100}, 12)  # the base, not ts6
    with pytest.raises(SystemExit, match="other lc settings"):
        attack_sweep.variant_row(tmp_path, "lc", "ts6", 100)
    assert attack_sweep.recorded_arguments("lc", folder) == (attack_sweep.variant_arguments("lc", "config"), 12)


def test_a_finished_run_of_other_epochs_is_refused(tmp_path: Path) -> None:
    _record(tmp_path / "iad_sharp_s100", {**attack_sweep.variant_arguments("iad", "sharp"), "seed": 100}, 30)
    with pytest.raises(SystemExit, match="other iad settings .*30 epochs"):
        attack_sweep.variant_row(tmp_path, "iad", "sharp", 100)
