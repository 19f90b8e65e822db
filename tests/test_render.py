"""The measured tables of README.md and docs/ equal their render from benchmarks/results/, and each render function
follows the figures of its results file.
"""

import json
from pathlib import Path

import pytest

from benchmarks import render

DETECTION_FIGURES = (
    "auroc", "tpr_at_1", "tpr_at_5", "threshold_fpr", "threshold_tpr", "victim_asr", "tpr_at_1_fired",
    "threshold_tpr_fired",
)  # fmt: skip
RESULT_FILES = {
    "attacks.csv": (
        "attack,arch,recipe,victim_ba,victim_ba_std,victim_ba_worst,victim_asr,victim_asr_std,victim_asr_worst,"
        "clean_floor_asr,clean_floor_asr_std,clean_floor_asr_worst,refine_ba,refine_ba_std,refine_ba_worst,"
        "refine_asr,refine_asr_std,refine_asr_worst,seeds,seconds\n"
        "badnets,small_cnn,refine,0.9817,0.0029,0.9800,1.0000,0.0000,1.0000,0.0011,0.0011,0.0022,"
        "0.9850,0.0026,0.9830,0.0004,0.0006,0.0011,0 1 2,599.9\n"
    ),
    "defenses.csv": (
        "attack,defense,seeds,ba,ba_std,ba_worst,asr,asr_std,asr_worst,any_class_asr,any_class_asr_std,"
        "any_class_asr_worst,ra,ra_std,ra_worst,der,der_std,der_worst,seconds\n"
        "badnets,none,0,0.9870,0.0000,0.9870,1.0000,0.0000,1.0000,1.0000,0.0000,1.0000,0.0000,0.0000,0.0000,,,,\n"
        "badnets,clean_floor,0,0.9780,0.0000,0.9780,0.0011,0.0000,0.0011,0.0050,0.0000,0.0050,0.9789,0.0000,0.9789,,,,"
        "\n"
        "badnets,refine,0,0.9790,0.0000,0.9790,0.0044,0.0000,0.0044,0.0050,0.0000,0.0050,0.9722,0.0000,0.9722,0.9938,"
        "0.0000,0.9938,82.4\n"
        "badnets,autoencoder,0,0.9710,0.0000,0.9710,0.1056,0.0000,0.1056,0.1100,0.0000,0.1100,0.8756,0.0000,0.8756,"
        "0.9392,0.0000,0.9392,29.3\n"
    ),
    "data_efficiency.csv": (
        "attack,fraction,images,batch_size,epochs,cosine_epochs,steps,ba,asr,ra,der,seconds\n"
        "badnets,0.01,36,36,1120,1120,1120,0.4300,0.0722,0.2800,0.6854,112.8\n"
    ),
    "speed.csv": (
        "part,setting,variant,device,batch,median_s,min_s,max_s,images_per_s,ratio,first_step_s,note\n"
        'steps,mnist,reference recipe (fp32),"CPU, 2 thread(s)",64,0.103,0.102,0.105,620.7,1.000,0.13,\n'
        'steps,mnist,project defaults,"CPU, 2 thread(s)",64,0.053,0.052,0.056,1217.5,1.962,0.06,\n'
        'fit,mnist,"1 process, project defaults","CPU, 2 thread(s)",64,0.0596,0.0585,0.0607,1074.0,1.809,,\n'
        'inference,U-Net 16,bare victim f(x),"CPU, 2 thread(s)",1,0.00766,0.00748,0.00796,130.5,1.000,,\n'
        'inference,U-Net 16,"defended, U-Net 16","CPU, 2 thread(s)",1,0.00943,0.00927,0.01122,106.0,0.813,,\n'
    ),
    "tuning.csv": (
        "victim,candidate,victim_ba,victim_asr,floor,refine_ba,refine_asr,asr_margin,ba_margin,seconds\n"
        "badnets_checker_tl,config,0.983,1.0,0.006667,0.989,0.002222,0.009445,0.011,278.9\n"
        "blended_a015,config,0.985,1.0,0.0,0.99,0.004444,0.005556,0.010,275.5\n"
    ),
    "time_to_defense.csv": (
        "variant,clean_s,victim_s,refine_s,main_job_s,epochs,victim_ba,defended_ba,defended_asr,agreement\n"
        "before,14.1,24.9,150.2,189.2,,0.979,0.988,0.0,\n"
        "after,14.0,25.1,120.1,159.2,27,0.979,0.987,0.0,0.9675\n"
    ),
    "attacks_seeds.csv": (
        "attack,arch,recipe,seed,victim_ba,victim_asr,clean_floor_asr,refine_ba,refine_agreement,refine_asr,seconds\n"
        "badnets,small_cnn,refine,0,0.9800,1.0000,0.0022,0.9800,0.9700,0.0000,150.0\n"
        "blended,small_cnn,refine,0,0.9000,1.0000,0.0000,0.9000,0.9900,0.0000,150.0\n"
    ),
    "detection.csv": (
        ",".join(["attack", "detector", "seeds", *(f"{f}{s}" for f in DETECTION_FIGURES for s in ("", "_worst"))])
        + "\nbadnets,refine,0 1,"
        + ",".join(["0.9994,0.9990"] * len(DETECTION_FIGURES))
        + "\nbadnets,strip,0 1,"
        + ",".join(["0.9876,0.9800"] * len(DETECTION_FIGURES))
        + "\n"
    ),
    "detection_tuning.csv": (
        "variant,score,auroc,tpr_at_1,tpr_at_5,threshold_fpr,threshold_tpr,victim_asr,tpr_at_1_fired,"
        "threshold_tpr_fired\n"
        "wanet_g8,kl_victim_defended,0.9979,0.9800,0.9944,0.0090,0.9756,0.9800,0.9900,0.9800\n"
        "mean,kl_victim_defended,0.9939,0.9368,0.9740,0.0080,0.8962,0.9500,0.9700,0.9200\n"
    ),
    "own_model.csv": (
        "case,variant,architecture,image_size,channels,unlabeled_images,victim_ba,victim_asr,floor,defended_ba,"
        "defended_asr,ba_change,agreement,epochs,seconds,recipe\n"
        "mlp_gray28,before,benchmarks.own_model_archs:mlp,28,1,800,0.93,0.9989,0.005556,0.851,0.0411,-0.079,0.8611,30,"
        "190.4,528d108\n"
        "mlp_gray28,after,benchmarks.own_model_archs:mlp,28,1,800,0.93,0.9989,0.005556,0.935,0.003333,0.005,0.9125,12,"
        "95.2,8c70374\n"
    ),
}
MAIN_JOB = {
    "job": "python pipeline.py on a test machine",
    "wall_clock_s": 269,
    "peak_memory_gb": 1.2,
    "no_defense": {"ba": 0.98, "asr": 1.0, "ra": 0.0},
    "defended": {"ba": 0.984, "asr": 0.0011, "ra": 0.9811, "der": 0.9994},
    "clean_floor": {"ba": 0.981, "asr": 0.0022, "ra": 0.9811},
}
CHANGES = [
    # (region, results file, a figure in it, the figure that replaces it, how the new one is rendered)
    ("attacks", "attacks.csv", "0.9850,0.0026", "0.9712,0.0026", "0.9712 ± 0.0026"),
    ("defenses_asr", "defenses.csv", "0.1056,0.0000,0.1056", "0.2468,0.0000,0.2468", "| 0.2468 |"),
    ("defenses_der", "defenses.csv", "0.9938,0.0000,0.9938", "0.9123,0.0000,0.9123", "| 0.9123 |"),
    ("defenses_time", "defenses.csv", "29.3", "31.7", "| Autoencoder | input_transform | 1 | 31.7 | 31.7 |"),
    ("defenses_verdict", "defenses.csv", "0.9938,0.0000,0.9938", "0.9123,0.0000,0.9123", "| 0.9123 | 0.9790 |"),
    ("data_efficiency", "data_efficiency.csv", "0.4300", "0.5432", "| 0.5432 |"),
    ("speed_steps", "speed.csv", "1217.5,1.962", "1300.1,2.100", "| 1300.1 | 2.10x |"),
    ("speed_fit", "speed.csv", "1074.0", "1111.1", "| 1111.1 |"),
    ("speed_inference", "speed.csv", "0.00943,", "0.01532,", "| 15.32 | 2.00x |"),
    ("tuning", "tuning.csv", "0.005556", "-0.001234", "| -0.0012 |"),
    ("own_model", "own_model.csv", "0.003333", "0.251234", "| 0.2512 |"),
    ("detection", "detection.csv", "0.9876,0.9800", "0.9512,0.9411", "| 0.9512 (0.9411) |"),
    ("detection_tuning", "detection_tuning.csv", "0.9939,0.9368", "0.9939,0.9123", "| 0.9939 | 0.9123 |"),
    ("time_to_defense", "time_to_defense.csv", "120.1,159.2", "37.5,76.6", "REFINE stage 0.25x, main job 0.40x"),
]


def write_results(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in RESULT_FILES.items():
        (folder / name).write_text(text)
    (folder / "main_job.json").write_text(json.dumps(MAIN_JOB))
    (folder / "time_to_defense.json").write_text(json.dumps({"conditions": "a test machine, nothing else running"}))
    return folder


@pytest.mark.parametrize("document", render.documents(), ids=lambda path: path.name)
def test_the_documents_equal_the_render_of_the_results_files(document: Path) -> None:
    _, stale = render.render_text(document.read_text(), source=document.name)
    assert stale == [], f"{document.name}: stale regions {stale}; run `python -m benchmarks.render`"


def test_every_renderer_is_shown_somewhere() -> None:
    shown = {match["name"] for path in render.documents() for match in render.REGION.finditer(path.read_text())}
    assert shown == set(render.RENDERERS)


@pytest.mark.parametrize(("region", "file", "old", "new", "rendered"), CHANGES, ids=[c[0] for c in CHANGES])
def test_a_changed_figure_changes_the_rendered_table(
    region: str, file: str, old: str, new: str, rendered: str, tmp_path: Path
) -> None:
    results = write_results(tmp_path)
    before = render.RENDERERS[region](results)
    assert rendered not in before
    path = results / file
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    after = render.RENDERERS[region](results)
    assert rendered in after


def test_the_main_job_table_and_sentence_follow_the_record(tmp_path: Path) -> None:
    results = write_results(tmp_path)
    # A record written before the any-class ASR was measured shows it as not measured
    assert "| REFINE | 0.9840 | 0.0011 | - | 0.9811 | 0.9994 |" in render.main_job(results)
    assert "| no defense | 0.9800 | 1.0000 | - | 0.0000 | n/a |" in render.main_job(results)
    assert "4 min 29 s" in render.main_job_cost(results)
    defended = {"ba": 0.5, "asr": 0.25, "any_class_asr": 0.375, "ra": 0.125, "der": 0.75}
    (results / "main_job.json").write_text(json.dumps({**MAIN_JOB, "defended": defended, "wall_clock_s": 61}))
    assert "| REFINE | 0.5000 | 0.2500 | 0.3750 | 0.1250 | 0.7500 |" in render.main_job(results)
    assert "1 min 1 s" in render.main_job_cost(results)


def test_the_main_job_table_says_its_label_free_agreement_when_the_record_has_one(tmp_path: Path) -> None:
    results = write_results(tmp_path)
    assert "agreement" not in render.main_job(results)
    estimate = {"agreement": 0.9675, "held_out_images": 400, "epoch": 30}
    (results / "main_job.json").write_text(json.dumps({**MAIN_JOB, "label_free": estimate}))
    assert "on 400 held-out training images (epoch 30): 0.9675." in render.main_job(results)


def test_the_attacks_table_tracks_the_agreement_against_the_ba_ratio_of_every_run(tmp_path: Path) -> None:
    text = render.attacks(write_results(tmp_path))
    # 0.97 - 0.98 / 0.98 = -0.03 and 0.99 - 0.90 / 0.90 = -0.01: mean -0.02, mean absolute 0.02, largest -0.03
    assert "over the 2 runs of `attacks_seeds.csv`: mean difference -0.0200, mean absolute difference 0.0200" in text
    assert "largest -0.0300; the agreement was below the ratio in 2 of 2 runs" in text
    assert "| REFINE BA | REFINE agreement | REFINE ASR | REFINE any-class ASR |" in text.splitlines()[0]


def test_the_time_to_defense_table_has_both_variants_their_ratio_and_the_224_px_projection(tmp_path: Path) -> None:
    results = write_results(tmp_path)
    text = render.time_to_defense(results)
    assert "| before | 150.2 | 189.2 | - | 0.9790 | 0.9880 | 0.0000 | - |" in text
    assert "| after | 120.1 | 159.2 | 27 | 0.9790 | 0.9870 | 0.0000 | 0.9675 |" in text
    assert "REFINE stage 0.80x, main job 0.84x" in text and "a test machine, nothing else running" in text
    own = {"arch": "mobilenet_v3_small", "batch_size": 64, "seconds_per_epoch": 30.0, "images_timed": 128,
           "projected_epoch_s": 351.6, "projected_images": 1500, "projected_epoch_draws": 1500,
           "projected_run_min_at_max_epochs": 175.8, "max_epochs": 30}  # fmt: skip
    (results / "time_to_defense.json").write_text(json.dumps({"conditions": "x", "own_model_224": own}))
    assert "5.9 min per epoch over 1500 images and at most 176 min for the default 30 epochs" in (
        render.time_to_defense(results)
    )
    own.update(projected_epoch_draws=3200, projected_epoch_s=750.0, projected_run_min_at_max_epochs=375.0)
    (results / "time_to_defense.json").write_text(json.dumps({"conditions": "x", "own_model_224": own}))
    assert "12.5 min per epoch over 1500 images (an epoch draws 3,200: min_epoch_samples) and at most 375 min" in (
        render.time_to_defense(results)
    )


def test_the_defense_matrix_has_the_floor_and_the_victim_first_and_the_registry_labels(tmp_path: Path) -> None:
    results = write_results(tmp_path)
    table = render.defenses(results, "der")
    columns = ("clean model (floor)", "victim (no defense)", "REFINE", "Autoencoder")
    assert "| attack | " + " | ".join(f"{column} (seeds 0)" for column in columns) + " |" in table
    assert "| badnets | - | - | 0.9938 | 0.9392 |" in table
    assert "REFINE has the higher mean DER on 1 of the 1 attacks" in render.defenses_verdict(results)
    (results / "defenses.csv").write_text(
        RESULT_FILES["defenses.csv"].replace(
            "badnets,refine,0,0.9790,0.0000,0.9790", "badnets,refine,0 1,0.9790,0.0010,0.9780"
        )
    )
    table = render.defenses(results, "ba")
    assert "| REFINE (seeds 0 1) |" in table and "| 0.9790 ± 0.0010 (0.9780) |" in table


def test_check_names_the_stale_file_and_region_and_a_rewrite_fixes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    results = write_results(tmp_path / "results")
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# r\n\n<!-- render:main_job -->\n<!-- /render:main_job -->\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("text\n<!-- render:tuning -->\n| old | table |\n<!-- /render:tuning -->\nmore text\n")
    assert render.main(["--check"], root=tmp_path, results_dir=results) == 1
    error = capsys.readouterr().err
    assert "README.md: region 'main_job'" in error and "docs/page.md: region 'tuning'" in error
    assert "| old | table |" in page.read_text()  # --check writes nothing

    assert render.main([], root=tmp_path, results_dir=results) == 0
    assert render.main(["--check"], root=tmp_path, results_dir=results) == 0
    assert (
        page.read_text()
        == f"text\n<!-- render:tuning -->\n\n{render.tuning(results)}\n\n<!-- /render:tuning -->\nmore text\n"
    )


def test_an_unknown_region_is_refused_naming_it_and_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"page.md: unknown region 'render:atacks'; use one of .*'attacks'"):
        render.render_text("<!-- render:atacks -->\n<!-- /render:atacks -->\n", tmp_path, "page.md")


def test_a_missing_results_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="attacks.csv not found: run the benchmark"):
        render.attacks(tmp_path)
