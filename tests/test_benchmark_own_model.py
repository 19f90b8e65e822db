"""benchmarks/own_model.py: a tiny case end to end (its folders, its models, both variants, the csv and md), the
reuse of finished stages, and the triggers and images the cases are made of.
"""

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks import own_model, render

TINY_CASE = own_model.Case(
    "tiny", "a plain CNN by import path, 12 px colour digits", "benchmarks.own_model_archs:plain_cnn", 12, 3, 40,
    own_model.Trigger("patch", 3, "bottom_left", colors=((1.0, 0.0, 0.0), (0.0, 0.0, 1.0))), target=1, seed=7,
    mean=(0.5,) * 3, std=(0.25,) * 3, epochs=1, user_flags=("--image-size", "12", "--mean", "0.5", "--std", "0.25"),
    test_images=60,
)  # fmt: skip
TINY_REFINE = [
    "--refine-arg=--trainer.max_epochs=1",
    "--refine-arg=--data.init_args.batch_size=16",
    "--refine-arg=--data.init_args.min_epoch_samples=0",  # one pass over the 36 training images
    "--refine-arg=--model.init_args.transform.init_args.base_width=4",
    "--refine-arg=--trainer.enable_progress_bar=false",
    "--refine-arg=--trainer.callbacks.init_args.formats=[]",  # no ONNX / TorchScript files
]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_tiny_case_runs_both_variants_writes_its_rows_and_reuses_finished_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(own_model, "CASES", {"tiny": TINY_CASE})
    runs, results = tmp_path / "runs", tmp_path / "results"
    common = ["--run-dir", str(runs), "--results-dir", str(results), "--allow-weak-victims", *TINY_REFINE]
    rows = own_model.main([*common, "--conditions", "a test"])
    assert [(row["case"], row["variant"]) for row in rows] == [("tiny", "before"), ("tiny", "after")]

    # the user's folders: PNG files at the case's size, test images in class folders, triggered ones of other classes
    user = runs / "tiny" / "user"
    assert len(list((user / "images").glob("*.png"))) == 40
    assert sum(1 for _ in (user / "test").glob("*/*.png")) == 60
    triggered = list((user / "triggered").glob("*.png"))
    done = json.loads((user / "done.json").read_text())
    assert done["files"] == {"images": 40, "test": 60, "triggered": len(triggered)} and 0 < len(triggered) < 60
    # the third party hands over bare weights and its clean model; the floor is the clean model's
    third_party = runs / "tiny" / "third_party"
    assert (third_party / "suspect.pt").is_file() and (third_party / "clean.pt").is_file()
    record = json.loads((third_party / "record.json").read_text())

    written = read_csv(results / "own_model.csv")
    assert list(written[0]) == own_model.FIELDS
    for row in written:
        report = json.loads((runs / "tiny" / row["variant"] / "report.json").read_text())
        assert float(row["victim_ba"]) == pytest.approx(report["no_defense"]["ba"])
        assert float(row["defended_asr"]) == pytest.approx(report["defended"]["asr"])
        assert float(row["floor"]) == pytest.approx(record["floor"], abs=1e-6)
        assert float(row["ba_change"]) == pytest.approx(report["defended"]["ba"] - report["no_defense"]["ba"], abs=1e-6)
        assert row["image_size"] == "12" and row["channels"] == "3" and row["unlabeled_images"] == "40"
    # the label-free estimate: "after" validates every epoch; the reference recipe of "before" every 10th, none here
    assert written[1]["epochs"] == "1" and 0 <= float(written[1]["agreement"]) <= 1
    assert written[0]["epochs"] == written[0]["agreement"] == ""
    # the victim as refine-pl measures it on the folders equals the third party's own measurement
    assert float(written[0]["victim_asr"]) == pytest.approx(record["victim_asr"], abs=1e-6)
    # "before" ran the 528d108 configs, "after" refine-pl defend as the user types it
    before = json.loads((runs / "tiny" / "before" / "timing.json").read_text())["command"]
    assert "configs/refine/reference.yaml" in before and any(c.endswith("own_model_528d108.yaml") for c in before)
    # the recipe of each row: 528d108's for "before", the last commit of refine-pl defend's configs for "after"
    assert written[0]["recipe"] == "528d108" and re.fullmatch(r"[0-9a-f]{7,}(\+changes)?", written[1]["recipe"])
    after = json.loads((runs / "tiny" / "after" / "timing.json").read_text())["command"]
    assert after[:4] == ["refine-pl", "defend", str(third_party / "suspect.pt"), str(user / "images")]
    assert after[after.index("--") - 2 : after.index("--")] == ["--out", str(runs / "tiny" / "after")]

    table = (results / "own_model.md").read_text()
    assert render.own_model(results) in table
    assert "| tiny | before |" in table and "| tiny | after |" in table
    assert "Gate" in table and "Conditions: " in table and table.rstrip().endswith("a test")

    # a finished stage is reused: the csv keeps the rows of variants not run; --redo moves the earlier run aside
    seconds = (runs / "tiny" / "after" / "timing.json").read_text()
    again = own_model.main([*common, "--variants", "after"])
    assert [(row["case"], row["variant"], row["seconds"]) for row in again] == [
        ("tiny", "after", float(written[1]["seconds"]))
    ]
    assert (runs / "tiny" / "after" / "timing.json").read_text() == seconds
    assert [row["variant"] for row in read_csv(results / "own_model.csv")] == ["before", "after"]
    own_model.main([*common, "--variants", "after", "--redo", "after"])
    assert len(list((runs / "tiny").glob("after.replaced-*"))) == 1
    assert (runs / "tiny" / "after" / "timing.json").read_text() != seconds


def test_a_case_definition_that_changed_is_refused_in_a_folder_of_the_old_one(tmp_path: Path) -> None:
    folder = tmp_path / "third_party"
    folder.mkdir()
    spec = own_model.case_spec(TINY_CASE, own_model.THIRD_PARTY_FIELDS, victim_epochs=1)
    (folder / "record.json").write_text(json.dumps({"case": {**spec, "target": 2}}))
    with pytest.raises(SystemExit, match="another definition of case tiny"):
        own_model.third_party(TINY_CASE, None, folder, 1, allow_weak=False)  # type: ignore[arg-type]


def test_a_patch_trigger_changes_its_corner_only_and_a_blend_is_seeded() -> None:
    images = torch.full((2, 3, 12, 12), 100, dtype=torch.uint8)
    stamped = TINY_CASE.trigger.stamp(images)
    assert torch.equal(stamped[:, :, :9], images[:, :, :9]) and torch.equal(stamped[:, :, :, 3:], images[:, :, :, 3:])
    assert stamped[0, :, 9, 0].tolist() == [255, 0, 0] and stamped[0, :, 9, 1].tolist() == [0, 0, 255]
    noise = [own_model.Trigger("blend", alpha=0.2, seed=seed).stamp(images) for seed in (1, 1, 2)]
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert (noise[0].float() - 100).abs().max() <= 0.2 * 155 + 1


def test_colour_images_keep_the_digit_and_differ_in_colour_from_image_to_image() -> None:
    digits = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    digits[:, :, 10:18, 12:16] = 255
    images = own_model.case_images(TINY_CASE, digits, seed=0)
    assert images.shape == (4, 3, 12, 12) and images.dtype == torch.uint8
    foreground, background = images[:, :, 6, 6].float(), images[:, :, 0, 0].float()
    assert ((foreground - background).abs().mean(1) >= 0.35 * 255 - 1).all()
    assert len({tuple(colour.tolist()) for colour in background}) == 4


def test_the_rows_of_other_cases_and_variants_are_kept_in_case_order(tmp_path: Path) -> None:
    path = tmp_path / "own_model.csv"
    names = list(own_model.CASES)
    old = [{"case": names[1], "variant": "after", "x": "old"}, {"case": names[0], "variant": "after", "x": "old"}]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", "variant", "x"])
        writer.writeheader()
        writer.writerows(old)
    new = [{"case": names[0], "variant": "after", "x": "new"}, {"case": names[0], "variant": "before", "x": "new"}]
    merged = own_model.merged_rows(path, new)
    assert [(row["case"], row["variant"], row["x"]) for row in merged] == [
        (names[0], "before", "new"), (names[0], "after", "new"), (names[1], "after", "old")
    ]  # fmt: skip


def test_the_gate_column_follows_the_floor_and_the_victim(tmp_path: Path) -> None:
    row = {
        "case": "c", "variant": "after", "architecture": "a", "image_size": "28", "channels": "1",
        "unlabeled_images": "800", "victim_ba": "0.9300", "victim_asr": "1.0", "floor": "0.0100",
        "defended_ba": "0.9250", "defended_asr": "0.0150", "ba_change": "-0.005", "agreement": "", "epochs": "",
        "seconds": "10",
    }  # fmt: skip
    assert render.meets_gate(row)  # ASR at floor + 0.005, BA at victim BA - 0.005
    for key, value in (("defended_asr", "0.0151"), ("defended_ba", "0.9249"), ("floor", "0.0000")):
        assert not render.meets_gate({**row, key: value}), key
    assert render.meets_gate({**row, "floor": "0.0", "defended_asr": "0.0100"})  # the 0.01 bound under a zero floor
    with (tmp_path / "own_model.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=own_model.FIELDS)
        writer.writeheader()
        writer.writerows([row, {**row, "variant": "before", "defended_asr": "0.5"}])
    lines = render.own_model(tmp_path).splitlines()
    assert lines[2].endswith("| - | - | 10 | - | yes |") and lines[3].endswith("| no |")
