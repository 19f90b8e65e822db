"""The measured tables of README.md and docs/, rendered from the results files of ``benchmarks/results/``.

Measured figures live in the results files only (the csv and json files the benchmarks write). A document shows
one by a region whose content this module renders, one function per table::

    <!-- render:attacks -->
    (the table, written by ``python -m benchmarks.render``)
    <!-- /render:attacks -->

``python -m benchmarks.render`` rewrites every region of README.md and docs/*.md from the results files;
``python -m benchmarks.render --check`` changes nothing and exits non-zero naming each file and region that differs
from its render (tests/test_render.py runs the same check, so CI fails on a stale figure).
"""

import argparse
import csv
import json
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
REGION = re.compile(r"<!-- render:(?P<name>[a-z0-9_]+) -->\n(?P<body>.*?)<!-- /render:(?P=name) -->", flags=re.S)


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of the csv file ``path`` as dicts of strings, in file order.

    Raises:
        FileNotFoundError: ``path`` is missing; the message names the benchmark that writes it.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the benchmark that writes it (see benchmarks/*.py)")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table of ``header`` and ``rows`` (cells already formatted)."""
    lines = [f"| {' | '.join(header)} |", "|---" * len(header) + "|"]
    return "\n".join([*lines, *(f"| {' | '.join(row)} |" for row in rows)])


def _fraction(value: str) -> str:
    return "-" if value == "" else f"{float(value):.4f}"


def _spread(row: dict[str, str], key: str) -> str:
    """``mean ± std (worst)`` of a figure of a summary row over seeds; ``-`` where the file predates the figure."""
    if key not in row:
        return "-"
    return f"{float(row[key]):.4f} ± {float(row[key + '_std']):.4f} ({float(row[key + '_worst']):.4f})"


def main_job(results_dir: Path = RESULTS) -> str:
    """The main job's before/after table, from ``main_job.json`` (the figures of its ``report.json``)."""
    report = json.loads((results_dir / "main_job.json").read_text())
    rows = []
    for key, label in (
        ("no_defense", "no defense"),
        ("defended", "REFINE"),
        ("clean_floor", "clean model (ASR floor)"),
    ):
        figures = report[key]
        der = figures.get("der")
        cells = [
            "-" if figures.get(name) is None else f"{figures[name]:.4f}"
            for name in ("ba", "asr", "any_class_asr", "ra")
        ]
        rows.append([label, *cells, "n/a" if der is None else f"{der:.4f}"])
    estimate = report.get("label_free")
    agreement = (
        f"\n\nLabel-free agreement with the victim on {estimate['held_out_images']} held-out training images "
        f"(epoch {estimate['epoch']}): {estimate['agreement']:.4f}."
        if estimate
        else ""
    )
    return table(["", "BA", "ASR", "any-class ASR", "RA", "DER"], rows) + agreement


def main_job_cost(results_dir: Path = RESULTS) -> str:
    """One sentence: what the main job cost where ``main_job.json`` was measured (wall clock, peak memory)."""
    record = json.loads((results_dir / "main_job.json").read_text())
    minutes, seconds = divmod(round(record["wall_clock_s"]), 60)
    return (
        f"Measured: {minutes} min {seconds} s wall clock and {record['peak_memory_gb']:.1f} GB peak memory for the "
        f"whole job after installation, {record['job']}."
    )


def attacks(results_dir: Path = RESULTS, name: str = "attacks") -> str:
    """The before/after table of ``benchmarks/attacks.py`` from ``<name>.csv``: mean ± std (worst seed) per figure."""
    figures = (
        "victim_ba", "victim_asr", "victim_any_class_asr", "clean_floor_asr", "clean_floor_any_class_asr", "refine_ba",
        "refine_agreement", "refine_asr", "refine_any_class_asr",
    )  # fmt: skip
    header = [
        "attack", "victim", "recipe", "seeds", "victim BA", "victim ASR", "victim any-class ASR", "clean floor ASR",
        "clean floor any-class ASR", "REFINE BA", "REFINE agreement", "REFINE ASR", "REFINE any-class ASR", "REFINE s",
    ]  # fmt: skip
    rows = [
        [
            row["attack"],
            row["arch"],
            row["recipe"],
            row["seeds"],
            *(_spread(row, key) for key in figures),
            f"{float(row['seconds']):.0f}",
        ]
        for row in read_csv(results_dir / f"{name}.csv")
    ]
    note = (
        "Mean ± standard deviation over the seeds of the row, the worst seed in parentheses (the lowest BA, victim ASR "
        "or agreement, the highest floor or REFINE ASR). any-class ASR: over the triggered test images, the largest "
        "share that any one class receives among those not of that class (REFINE's remap moves the target class, so a "
        "trigger that survived would show here and not in the ASR). REFINE agreement: the label-free estimate, the "
        "share of held-out training images on which the defended model gives the victim's class (no label read). "
        "REFINE s: mean wall clock of the REFINE stage (fit and test). `-`: not measured when the file was written."
    )
    return table(header, rows) + "\n\n" + note + agreement_tracking(results_dir / f"{name}_seeds.csv")


def adaptive(results_dir: Path = RESULTS) -> str:
    """The table of ``benchmarks/adaptive.py`` from ``adaptive.csv``: mean ± std (worst seed), victim time, verdicts."""
    figures = (
        "victim_ba", "victim_asr", "victim_any_class_asr", "clean_floor_any_class_asr", "refine_ba", "refine_asr",
        "refine_any_class_asr", "refine_ra",
    )  # fmt: skip
    header = [
        "attack", "seeds", "victim BA", "victim ASR", "victim any-class ASR", "clean floor any-class ASR", "REFINE BA",
        "REFINE ASR", "REFINE any-class ASR", "REFINE RA", "victim training s", "real backdoor", "REFINE holds",
    ]  # fmt: skip
    rows = []
    for row in read_csv(results_dir / "adaptive.csv"):
        seconds = "-" if row["victim_seconds"] == "nan" else f"{float(row['victim_seconds']):.0f}"
        cells = [_spread(row, key) for key in figures]
        rows.append([row["attack"], row["seeds"], *cells, seconds, row["real_backdoor"], row["holds"]])
    note = (
        "Mean ± standard deviation over the seeds, the worst seed in parentheses (the lowest BA, victim ASR or RA, the "
        "highest floor or REFINE ASR). any-class ASR: over the triggered test images, the largest share any one class "
        "receives among those not of that class. real backdoor: in every seed victim ASR >= 0.90 and victim BA at most "
        "2 points below the clean model's. REFINE holds: mean REFINE any-class ASR at most the floor's + 1 point, "
        "mean REFINE BA at most 0.5 point below the victim's, and in every seed the any-class ASR at most that seed's "
        "floor + 2 points. victim training s: mean wall clock of the attack's victim training (`-`: not timed whole)."
    )
    return table(header, rows) + "\n\n" + note


def adaptive_verdict(results_dir: Path = RESULTS) -> str:
    """One sentence from ``adaptive.csv``: against which adaptive attacks REFINE holds, over which seeds."""
    rows = read_csv(results_dir / "adaptive.csv")
    held = [row["attack"] for row in rows if row["holds"] == "yes"]
    failed = [row["attack"] for row in rows if row["holds"] != "yes"]
    seeds = sorted({seed for row in rows for seed in row["seeds"].split()}, key=int)
    verdict = f"REFINE holds against {len(held)} of the {len(rows)} adaptive attacks measured"
    verdicts = [f"holds: {', '.join(held)}" if held else "", f"does not hold: {', '.join(failed)}" if failed else ""]
    return f"{verdict} (seeds {', '.join(seeds)}; {'; '.join(v for v in verdicts if v)})."


def adaptive_survival(results_dir: Path = RESULTS) -> str:
    """How much of each adaptive trigger gets through REFINE's transform, per seed, from ``adaptive_seeds.csv``."""
    keys = ("victim_target", "through_t_target", "through_t_target_clean", "perturbation_ratio")
    rows = [
        [row["attack"], row["seed"], *(f"{float(row[f'survival_{key}']):.4f}" for key in keys)]
        for row in read_csv(results_dir / "adaptive_seeds.csv")
    ]
    header = [
        "attack",
        "seed",
        "f(x + trigger) = t",
        "f(T(x + trigger)) = t",
        "f(T(x)) = t",
        "trigger after / before T",
    ]
    note = (
        "On the held-out test images of classes other than the target t and M(t) (the class REFINE's remap sends t "
        "to). f(T(x + trigger)) = t: the share on which the trigger survives the transform, so that the defended "
        "model says M(t), one fixed class; f(T(x)) = t: the same without the trigger. trigger after / before T: "
        "mean ||T(x + trigger) - T(x)|| / ||trigger||."
    )
    return table(header, rows) + "\n\n" + note


def agreement_tracking(path: Path) -> str:
    """How the label-free agreement of each per-seed row tracks its REFINE BA relative to the victim's (a paragraph)."""
    rows = (
        [row for row in read_csv(path) if row.get("refine_agreement", "nan") not in ("", "nan")]
        if path.is_file()
        else []
    )
    if not rows:
        return ""
    gaps = [float(row["refine_agreement"]) - float(row["refine_ba"]) / float(row["victim_ba"]) for row in rows]
    below = sum(gap < 0 for gap in gaps)
    return (
        f"\n\nThe label-free agreement against the REFINE BA relative to the victim's (REFINE BA / victim BA), over "
        f"the {len(rows)} runs of `{path.name}`: mean difference {sum(gaps) / len(gaps):+.4f}, mean absolute "
        f"difference {sum(abs(gap) for gap in gaps) / len(gaps):.4f}, largest {max(gaps, key=abs):+.4f}; the "
        f"agreement was below the ratio in {below} of {len(rows)} runs (it is measured on held-out training images, "
        "the BA on the test images)."
    )


METRICS = {"asr": "ASR", "any_class_asr": "any-class ASR", "ba": "BA", "ra": "RA", "der": "DER"}


def _matrix(results_dir: Path) -> tuple[dict[tuple[str, str], dict[str, str]], list[str], list[str]]:
    """The cells of ``defenses.csv`` by (attack, defense), its attacks, and its defense columns in table order."""
    rows = read_csv(results_dir / "defenses.csv")
    cells = {(row["attack"], row["defense"]): row for row in rows}
    defenses = list(dict.fromkeys(row["defense"] for row in rows if row["defense"] not in ("clean_floor", "none")))
    return cells, list(dict.fromkeys(row["attack"] for row in rows)), defenses


def _matrix_cell(row: dict[str, str] | None, metric: str, seeds: str) -> str:
    """A cell of the matrix: the mean (``mean ± std (worst)`` over several seeds); its seeds when not ``seeds``."""
    if row is None:
        return "not run"
    if row.get(metric, "") == "":
        return "-"
    several = len(row["seeds"].split()) > 1
    text = _spread(row, metric) if several else f"{float(row[metric]):.4f}"
    return text if row["seeds"] == seeds else f"{text} [seeds {row['seeds']}]"


def _column_seeds(cells: dict[tuple[str, str], dict[str, str]], defense: str) -> str:
    """The seeds most cells of the ``defense`` column hold."""
    held = [row["seeds"] for (_, column), row in cells.items() if column == defense]
    return max(dict.fromkeys(held), key=held.count)


def defenses(results_dir: Path = RESULTS, metric: str = "asr") -> str:
    """One metric of the attacks x defenses matrix of ``benchmarks/defenses.py``, from ``defenses.csv``.

    A column's header says the seeds its cells hold; a cell holding other seeds says its own; several seeds give
    ``mean ± std (worst)``.
    """
    from refine_pl.defenses import DEFENSES  # deferred: the labels of the defenses, with torch behind them

    cells, attacks, defenses = _matrix(results_dir)
    columns = ["clean_floor", "none", *defenses]
    labels = {"clean_floor": "clean model (floor)", "none": "victim (no defense)"}
    seeds = {column: _column_seeds(cells, column) for column in columns}
    header = ["attack"] + [
        f"{labels[c] if c in labels else DEFENSES[c].label} (seeds {seeds[c]})" for c in columns
    ]  # fmt: skip
    body = [[attack, *(_matrix_cell(cells.get((attack, c)), metric, seeds[c]) for c in columns)] for attack in attacks]
    return f"**{METRICS[metric]}**\n\n" + table(header, body)


def defenses_time(results_dir: Path = RESULTS) -> str:
    """Each defense's wall clock in the matrix of ``defenses.csv``: mean and largest over its attacks."""
    from refine_pl.defenses import DEFENSES  # deferred: the labels and kinds of the defenses

    cells, _, defenses = _matrix(results_dir)
    rows = []
    for defense in defenses:
        seconds = [float(row["seconds"]) for (_, column), row in cells.items() if column == defense]
        entry = DEFENSES[defense]
        rows.append(
            [entry.label, entry.kind, str(len(seconds)), f"{sum(seconds) / len(seconds):.1f}", f"{max(seconds):.1f}"]
        )
    note = (
        "Seconds: wall clock of a defense's run (fit and test; test only for the training-free ones), averaged over "
        "the seeds of each attack, then over the attacks held (mean) or their largest."
    )
    return table(["defense", "kind", "attacks", "mean s", "largest s"], rows) + "\n\n" + note


def defenses_verdict(results_dir: Path = RESULTS) -> str:
    """Per attack: REFINE against the other defense with the highest mean DER (REFINE's ablations left out)."""
    from refine_pl.defenses import DEFENSES  # deferred: the labels of the defenses

    cells, attacks, defenses = _matrix(results_dir)
    others = [d for d in defenses if not d.startswith("refine")]
    rows, wins, compared = [], 0, 0
    for attack in attacks:
        refine = cells.get((attack, "refine"))
        held = [cells[attack, d] for d in others if (attack, d) in cells]
        if refine is None or not held:
            continue
        best = max(held, key=lambda row: float(row["der"]))
        won = float(refine["der"]) >= float(best["der"])
        wins, compared = wins + won, compared + 1
        figures = [
            _fraction(row[key]) for row in (refine, best) for key in ("der", "ba", "asr", "any_class_asr")
        ]  # fmt: skip
        rows.append([attack, *figures[:4], DEFENSES[best["defense"]].label, *figures[4:], "REFINE" if won else "other"])
    header = [
        "attack", "REFINE DER", "REFINE BA", "REFINE ASR", "REFINE any-class ASR", "best other defense (DER)",
        "its DER", "its BA", "its ASR", "its any-class ASR", "higher DER",
    ]  # fmt: skip
    return (
        table(header, rows)
        + f"\n\nREFINE has the higher mean DER on {wins} of the {compared} attacks where both are measured (means "
        "over the seeds each holds; REFINE's ablations are not counted as other defenses)."
    )


def defenses_true_labels(results_dir: Path = RESULTS) -> str:
    """The labelled defenses with the victim's predictions and the true labels, from ``defenses_true_labels.csv``."""
    from refine_pl.defenses import DEFENSES  # deferred: the labels of the defenses

    rows = read_csv(results_dir / "defenses_true_labels.csv")
    body = [
        [row["attack"], DEFENSES[row["defense"]].label, "true" if row["labels"] == "true" else "victim's predictions"]
        + [_fraction(row[metric]) for metric in ("ba", "asr", "any_class_asr", "der")]
        + [f"{float(row['seconds']):.0f}"]
        for row in rows
    ]
    header = ["attack", "defense", "labels", "BA", "ASR", "any-class ASR", "DER", "seconds"]
    note = (
        "Seed 0. The matrix's runs read no label (the victim's predictions on the same images); the side rows read "
        "the training set's true labels."
    )
    if not body:
        return "No true-label side row has finished yet (`python benchmarks/defenses.py --true-labels`)."
    return table(header, body) + "\n\n" + note


def data_efficiency(results_dir: Path = RESULTS) -> str:
    """REFINE's data-efficiency curve of ``benchmarks/defenses.py``, from ``data_efficiency.csv``."""
    rows = [
        [row["attack"], f"{float(row['fraction']):g}", row["images"], row["batch_size"], row["epochs"], row["steps"]]
        + [_fraction(row[metric]) for metric in ("ba", "asr", "ra", "der")]
        + [f"{float(row['seconds']):.0f}"]
        for row in read_csv(results_dir / "data_efficiency.csv")
    ]
    header = ["attack", "fraction", "images", "batch", "epochs", "steps", "BA", "ASR", "RA", "DER", "seconds"]
    return table(header, rows)


def speed(results_dir: Path = RESULTS, part: str = "steps") -> str:
    """One part (``steps``, ``fit`` or ``inference``) of ``benchmarks/speed.py``'s timings, from ``speed.csv``."""
    rows = [row for row in read_csv(results_dir / "speed.csv") if row["part"] == part]
    device = "Device: " + ", ".join(dict.fromkeys(row["device"] for row in rows)) + "; medians over the rounds."
    if part == "inference":
        bare: dict[tuple[str, str], float] = {}
        body = []
        for row in rows:  # each U-Net and batch: the bare victim's row first, then the defended classifier's
            latency = float(row["median_s"])
            bare.setdefault((row["setting"], row["batch"]), latency)
            ratio = latency / bare[row["setting"], row["batch"]]
            body.append([row["setting"], row["batch"], row["variant"], f"{latency * 1000:.2f}", f"{ratio:.2f}x"])
        return table(["U-Net", "batch", "classifier", "latency ms", "latency vs bare victim"], body) + "\n\n" + device
    baseline = {"steps": "vs reference recipe", "fit": "vs every option off"}[part]
    body = [
        [row["setting"], row["variant"], row["batch"], row["images_per_s"], f"{float(row['ratio']):.2f}x"]
        for row in rows
    ]
    return table(["setting", "variant", "batch", "images / s", baseline], body) + "\n\n" + device


def tuning(results_dir: Path = RESULTS, name: str = "tuning") -> str:
    """The candidates of ``benchmarks/tune_refine.py`` from ``<name>.csv``: worst margins to the gate, mean ASR.

    Files written since the label-free stopping rule also give the mean epochs trained and the mean agreement.
    """
    rows = read_csv(results_dir / f"{name}.csv")
    label_free = "epochs" in rows[0]
    body = []
    for candidate in dict.fromkeys(row["candidate"] for row in rows):
        group = [row for row in rows if row["candidate"] == candidate]

        def values(key: str, group: list[dict[str, str]] = group) -> list[float]:
            return [float(row[key]) for row in group]

        gains = [float(row["refine_ba"]) - float(row["victim_ba"]) for row in group]
        cells = [
            candidate,
            f"{min(values('asr_margin')):+.4f}",
            f"{min(values('ba_margin')):+.4f}",
            f"{sum(values('refine_asr')) / len(group):.4f}",
            f"{sum(gains) / len(gains):+.4f}",
        ]
        if label_free:
            cells += [f"{sum(values('epochs')) / len(group):.1f}", f"{sum(values('agreement')) / len(group):.4f}"]
        body.append([*cells, f"{max(values('seconds')):.0f}"])
    header = ["candidate", "worst ASR margin", "worst BA margin", "mean REFINE ASR", "mean REFINE BA - victim BA"]
    if label_free:
        header += ["mean epochs", "mean agreement"]
    note = (
        "Victims: " + ", ".join(dict.fromkeys(row["victim"] for row in rows)) + ". A positive margin passes the gate."
    )
    return table([*header, "max s"], body) + "\n\n" + note


def time_to_defense(results_dir: Path = RESULTS) -> str:
    """The main job's seconds before and after issue 23 (``time_to_defense.csv``), its conditions, the 224 px part."""
    rows = {row["variant"]: row for row in read_csv(results_dir / "time_to_defense.csv")}
    record = json.loads((results_dir / "time_to_defense.json").read_text())
    body = [
        [
            variant, row["refine_s"], row["main_job_s"], row["epochs"] or "-", _fraction(row["victim_ba"]),
            _fraction(row["defended_ba"]), _fraction(row["defended_asr"]), _fraction(row["agreement"]),
        ]
        for variant, row in rows.items()
    ]  # fmt: skip
    header = ["variant", "REFINE stage s", "main job s", "epochs", "victim BA", "defended BA", "ASR", "agreement"]
    lines = [table(header, body)]
    if {"before", "after"} <= rows.keys():
        before, after = rows["before"], rows["after"]
        lines.append(
            f"After / before: REFINE stage {float(after['refine_s']) / float(before['refine_s']):.2f}x, main job "
            f"{float(after['main_job_s']) / float(before['main_job_s']):.2f}x. Measured one after the other in one "
            f"run on {record['conditions']}."
        )
    own = record.get("own_model_224")
    if own:
        drawn = own["projected_epoch_draws"]
        draws = f" (an epoch draws {drawn:,}: min_epoch_samples)" if drawn > own["projected_images"] else ""
        lines.append(
            f"224 px own-model job (`refine-pl defend`, {own['arch']}, batch {own['batch_size']}): "
            f"{own['seconds_per_epoch']:.1f} s per epoch over {own['images_timed']} synthetic images, so "
            f"{own['projected_epoch_s'] / 60:.1f} min per epoch over {own['projected_images']} images{draws} and at "
            "most "
            f"{own['projected_run_min_at_max_epochs']:.0f} min for the default {own['max_epochs']} epochs (the "
            "stopping rule may end it sooner)."
        )
    return "\n\n".join(lines)


GATE = "ASR <= max(0.01, floor + 0.005) and BA >= victim BA - 0.005"
"""The gate of a defended row (the attacks table's), as :func:`meets_gate` applies it."""


def meets_gate(row: dict[str, str]) -> bool:
    """Whether a row of ``own_model.csv`` meets :data:`GATE` (defended figures against the victim's and the floor)."""
    floor, victim_ba = float(row["floor"]), float(row["victim_ba"])
    return float(row["defended_asr"]) <= max(0.01, floor + 0.005) and float(row["defended_ba"]) >= victim_ba - 0.005


def own_model(results_dir: Path = RESULTS, name: str = "own_model") -> str:
    """The own-model cases of ``benchmarks/own_model.py`` before and after, from ``<name>.csv``, with the gate."""
    body = []
    for row in read_csv(results_dir / f"{name}.csv"):
        agreement = "-" if row["agreement"] == "" else f"{float(row['agreement']):.4f}"
        body.append(
            [
                row["case"], row["variant"], f"`{row['architecture']}`", f"{row['image_size']} x {row['channels']}",
                row["unlabeled_images"], *(_fraction(row[key]) for key in ("victim_ba", "victim_asr", "floor")),
                *(_fraction(row[key]) for key in ("defended_ba", "defended_asr")), f"{float(row['ba_change']):+.4f}",
                agreement, row["epochs"] or "-", f"{float(row['seconds']):.0f}", row.get("recipe") or "-",
                "yes" if meets_gate(row) else "no",
            ]
        )  # fmt: skip
    header = [
        "case", "variant", "architecture", "px x channels", "unlabeled images", "victim BA", "victim ASR", "floor",
        "defended BA", "defended ASR", "BA change", "agreement", "epochs", "seconds", "recipe", "gate",
    ]  # fmt: skip
    return table(header, body)


def detection(results_dir: Path = RESULTS) -> str:
    """The table of ``benchmarks/detection.py`` from ``detection.csv``: per attack and detector, mean (worst seed)."""

    def figure(row: dict[str, str], key: str) -> str:
        return f"{float(row[key]):.4f} ({float(row[key + '_worst']):.4f})"

    labels = {"refine": "REFINE: victim vs defended", "strip": "STRIP"}
    keys = ("auroc", "tpr_at_1", "tpr_at_5", "threshold_fpr", "threshold_tpr", "victim_asr", "tpr_at_1_fired")
    rows = [
        [row["attack"], labels.get(row["detector"], row["detector"]), row["seeds"], *(figure(row, k) for k in keys)]
        for row in read_csv(results_dir / "detection.csv")
    ]
    header = [
        "attack", "detector", "seeds", "AUROC", "TPR @ 1 % FPR", "TPR @ 5 % FPR", "FPR at the label-free threshold",
        "TPR at the label-free threshold", "victim ASR (fired)", "TPR @ 1 % FPR on fired",
    ]  # fmt: skip
    note = (
        "Mean over the seeds held, the worst seed in parentheses (the lowest AUROC or TPR, the highest FPR). "
        "Positives: the triggered test images whose true class is not the target; negatives: the clean test images. "
        "AUROC and TPR @ FPR from the ROC (torchmetrics); the label-free threshold is chosen at a target FPR of 1 % on "
        "the benign images the REFINE run held out, without a label, and its FPR is measured on the clean test images. "
        "fired: the triggered images on which the victim gives the target (the others fool nobody: both models give "
        "their true class); TPR @ 1 % FPR on fired counts those only."
    )
    return table(header, rows) + "\n\n" + note


def detection_tuning(results_dir: Path = RESULTS) -> str:
    """The candidate detection scores on the tuning victims, from ``detection_tuning.csv`` (mean and worst rows)."""
    rows = [
        [row["score"], row["variant"], *(f"{float(row[k]):.4f}" for k in ("auroc", "tpr_at_1", "tpr_at_5",
                                                                          "threshold_fpr", "threshold_tpr"))]
        for row in read_csv(results_dir / "detection_tuning.csv")
        if row["variant"] in ("mean", "worst")
    ]  # fmt: skip
    header = ["score", "over tuning victims", "AUROC", "TPR @ 1 % FPR", "TPR @ 5 % FPR", "FPR at threshold",
              "TPR at threshold"]  # fmt: skip
    return table(header, rows)


def _measured(value: str, digits: int = 4) -> str:
    """A figure of a csv cell, ``-`` where it was not measured (empty or NaN)."""
    return "-" if value in ("", "nan") else f"{float(value):.{digits}f}"


def black_box(results_dir: Path = RESULTS, name: str = "black_box") -> str:
    """Black-box REFINE beside white-box REFINE, from ``<name>.csv`` (``benchmarks/black_box.py``)."""
    header = [
        "attack", "seed", "answers", "surrogate", "query budget", "BA", "ASR", "any-class ASR",
        "surrogate agreement", "queries", "seconds", "white-box BA", "white-box ASR", "white-box any-class ASR",
        "white-box seconds",
    ]  # fmt: skip
    rows = []
    for row in read_csv(results_dir / f"{name}.csv"):
        run = [row["attack"], row["seed"], row["mode"], row["surrogate"], f"{float(row['budget']):g}"]
        figures = [_measured(row[key]) for key in ("ba", "asr", "any_class_asr", "surrogate_agreement")]
        cost = [row["queries"], _measured(row["seconds"], 0)]
        white_box = [_measured(row[f"white_box_{key}"]) for key in ("ba", "asr", "any_class_asr")]
        rows.append([*run, *figures, *cost, *white_box, _measured(row["white_box_seconds"], 0)])
    return table(header, rows)


def black_box_variants(results_dir: Path = RESULTS) -> str:
    """The black-box settings side by side (``benchmarks/black_box.py --variant``).

    Each cell of a variant's ``black_box_<variant>.csv`` comes under the config's row of the same cell
    (``black_box.csv``).
    """
    config = {_black_box_cell(row): row for row in read_csv(results_dir / "black_box.csv")}
    variants = {}
    for path in sorted(results_dir.glob("black_box_*.csv")):
        for row in read_csv(path):
            variants.setdefault(_black_box_cell(row), []).append((path.stem.removeprefix("black_box_"), row))
    header = [
        "attack", "seed", "answers", "surrogate", "settings", "BA", "ASR", "any-class ASR", "surrogate agreement",
        "queries", "white-box BA", "white-box any-class ASR",
    ]  # fmt: skip
    body = []
    for cell in sorted(variants):
        runs = ([("config", config[cell])] if cell in config else []) + variants[cell]
        for name, row in runs:
            figures = [_measured(row[key]) for key in ("ba", "asr", "any_class_asr", "surrogate_agreement")]
            white_box = [_measured(row[f"white_box_{key}"]) for key in ("ba", "any_class_asr")]
            body.append([row["attack"], row["seed"], row["mode"], row["surrogate"], name, *figures, row["queries"],
                         *white_box])  # fmt: skip
    return table(header, body)


def _black_box_cell(row: dict[str, str]) -> tuple[str, int, str, str, float]:
    return row["attack"], int(row["seed"]), row["mode"], row["surrogate"], float(row["budget"])


RENDERERS: dict[str, Callable[[Path], str]] = {
    "main_job": main_job,
    "main_job_cost": main_job_cost,
    "attacks": attacks,
    "attacks_quiet": partial(attacks, name="attacks_quiet"),
    "attacks_reference": partial(attacks, name="attacks_reference"),
    "adaptive": adaptive,
    "adaptive_survival": adaptive_survival,
    "adaptive_verdict": adaptive_verdict,
    **{f"defenses_{metric}": partial(defenses, metric=metric) for metric in METRICS},
    "defenses_time": defenses_time,
    "defenses_verdict": defenses_verdict,
    "defenses_true_labels": defenses_true_labels,
    "data_efficiency": data_efficiency,
    **{f"speed_{part}": partial(speed, part=part) for part in ("steps", "fit", "inference")},
    "tuning": tuning,
    "time_to_defense": time_to_defense,
    "tuning_seed100": partial(tuning, name="tuning_seed100"),
    **{
        name: partial(tuning, name=name)
        for name in ("tuning_e8", "tuning_e12", "tuning_recipe", "tuning_w8", "tuning_d2_probe")
    },
    "own_model": own_model,
    "detection": detection,
    "detection_tuning": detection_tuning,
    "black_box": black_box,
    "black_box_variants": black_box_variants,
}
"""Region name -> the function that renders its content from a results folder."""


def documents(root: Path = REPO) -> list[Path]:
    """The files whose regions are rendered: ``README.md`` and every ``docs/*.md`` under ``root``."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render_text(text: str, results_dir: Path = RESULTS, source: str = "<text>") -> tuple[str, list[str]]:
    """``text`` with every region rendered from ``results_dir``, and the names of the regions that changed.

    Raises:
        ValueError: a region names no renderer; the message names ``source``, the region and the known names.
    """
    stale = []

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise ValueError(f"{source}: unknown region 'render:{name}'; use one of {sorted(RENDERERS)}")
        body = f"\n{RENDERERS[name](results_dir)}\n\n"
        if body != match["body"]:
            stale.append(name)
        return f"<!-- render:{name} -->\n{body}<!-- /render:{name} -->"

    return REGION.sub(replace, text), stale


def main(argv: list[str] | None = None, root: Path = REPO, results_dir: Path = RESULTS) -> int:
    """Rewrites the regions of the documents under ``root``, or with ``--check`` reports the stale ones.

    Returns:
        0, or 1 when ``--check`` found a region that differs from its render.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 naming each stale region")
    args = parser.parse_args(argv)
    stale = []
    for path in documents(root):
        text = path.read_text()
        rendered, names = render_text(text, results_dir, str(path.relative_to(root)))
        stale += [f"{path.relative_to(root)}: region '{name}'" for name in names]
        if names and not args.check:
            path.write_text(rendered)
    if args.check and stale:
        print("Stale figures (run `python -m benchmarks.render` to rewrite them):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
