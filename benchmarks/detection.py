"""Catching triggered inputs at inference: REFINE's victim-vs-defended detector against STRIP, per attack and seed.

Inference only: every figure is measured on REFINE runs that already exist (``benchmarks/attacks.py`` and
``benchmarks/adaptive.py`` write them under ``--run-dir``: ``<attack>_s<seed>/refine``), and only on finished ones
(``report.json`` and ``timing.json`` present), so it can run while those benchmarks still train. For each run:

- the run's own data split is rebuilt from its ``config.yaml``: the benign images REFINE held out and never trained
  on (its ``val_set``) choose both detectors' thresholds without a label, at ``--fpr``; the test set's clean images
  are the negatives and its triggered images whose true class is not the target (the attack rebuilt from the victim
  checkpoint's record) the positives;
- REFINE's detector (:func:`refine_pl.detection.detection_score`) and STRIP on the victim
  (:func:`refine_pl.detection.strip_score`, N = 100 held-out benign images superimposed at weight 1) score them;
- AUROC, TPR at 1 % and 5 % FPR (torchmetrics' ROC), and the FPR / TPR at the label-free threshold.

Writes to ``--results-dir``: ``detection_seeds.csv`` (one row per attack, seed and detector), ``detection.csv`` (mean
and worst seed per attack and detector, with the seeds held), ``detection.md`` (:func:`benchmarks.render.detection`
and the goal's verdicts) and ``detection_roc.png`` (ROC curves of the first seed of each attack). Per-run scores are
cached under ``--cache-dir``, so a rerun only scores runs it has not seen.

``--tuning`` instead compares candidate scores on the tuning victims (``runs/tuning/<variant>/recipe``, never the
table's attacks) and writes ``detection_tuning.csv`` / ``.md``: the measurements the score was chosen on.

    python benchmarks/detection.py --run-dir /path/to/runs/attacks
    python benchmarks/detection.py --tuning --run-dir /path/to/runs/tuning
"""

import argparse
import csv
import importlib
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import yaml
from torch import Tensor
from torchmetrics.classification import BinaryROC

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/detection.py` from the root

from benchmarks import render
from refine_pl.attacks import attack_from_spec
from refine_pl.detection import (
    DEFAULT_FPR,
    STRIP_REPLICAS,
    detection_metrics,
    detection_score,
    label_free_threshold,
    rates_at,
    score_ranks,
    strip_score,
)
from refine_pl.export import load_defended
from refine_pl.weights import read_weights_file

REPO = Path(__file__).resolve().parents[1]
ATTACKS = ("badnets", "blended", "wanet", "physical_ba", "iad", "lc", "batt", "adaptive_patch")
"""The attacks table's attacks (benchmarks/victims.py), in its order."""
ADAPTIVE = ("robust_trigger", "low_frequency", "refine_in_loop")
"""The adaptive attacks of benchmarks/adaptive.py."""
DETECTORS = ("refine", "strip")
GOAL_AUROC, GOAL_TPR = 0.99, 0.95
"""Issue 27's goal for REFINE's detector on every attack: AUROC >= 0.99 and TPR at 1 % FPR >= 0.95."""
FIGURES = ("auroc", "tpr_at_1", "tpr_at_5", "threshold_fpr", "threshold_tpr", "victim_asr", "tpr_at_1_fired",
           "threshold_tpr_fired")  # fmt: skip
SEED_COLUMNS = ("attack", "seed", "detector", *FIGURES, "threshold", "benign_images", "clean", "triggered", "seconds")


def _probabilities(victim_logits: Tensor, defended_logits: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    victim, defended = victim_logits.float().softmax(1), defended_logits.float().softmax(1)
    return victim, defended, victim.argmax(1), defended.argmax(1)


def _victim_confidence_x_defended_rejection(v: Tensor, d: Tensor) -> Tensor:
    victim, defended, victim_class, _ = _probabilities(v, d)
    return victim.max(1).values * (1 - defended.gather(1, victim_class[:, None])[:, 0])


def _disagree(v: Tensor, d: Tensor) -> Tensor:
    _, _, victim_class, defended_class = _probabilities(v, d)
    return (victim_class != defended_class).float()


def _weighted_disagree(v: Tensor, d: Tensor) -> Tensor:
    victim, defended, victim_class, defended_class = _probabilities(v, d)
    weight = victim.max(1).values * defended.max(1).values
    return (victim_class != defended_class).float() * weight


def _defended_rejection(v: Tensor, d: Tensor) -> Tensor:
    _, defended, victim_class, _ = _probabilities(v, d)
    return 1 - defended.gather(1, victim_class[:, None])[:, 0]


def _total_variation(v: Tensor, d: Tensor) -> Tensor:
    victim, defended, _, _ = _probabilities(v, d)
    return 0.5 * (victim - defended).abs().sum(1)


def _kl_reverse(v: Tensor, d: Tensor) -> Tensor:
    return detection_score(d, v)


def _jensen_shannon(v: Tensor, d: Tensor) -> Tensor:
    victim, defended, _, _ = _probabilities(v, d)
    middle = (0.5 * (victim + defended)).clamp(min=1e-12).log()
    return 0.5 * (detection_score(v, middle) + detection_score(d, middle))


CANDIDATES = {
    "kl_victim_defended": detection_score,
    "victim_confidence_x_defended_rejection": _victim_confidence_x_defended_rejection,
    "disagree": _disagree,
    "weighted_disagree": _weighted_disagree,
    "defended_rejection": _defended_rejection,
    "total_variation": _total_variation,
    "kl_defended_victim": _kl_reverse,
    "jensen_shannon": _jensen_shannon,
}
"""Candidate scores from the two models' logits, compared by ``--tuning``: the chosen one
(:func:`~refine_pl.detection.detection_score`) first. ``disagree`` is the CSV's column as it was; ``weighted_disagree``
the disagreement weighted by each model's confidence in its own class (the issue's example)."""


def _build(spec: dict[str, Any]) -> Any:
    """An object from a LightningCLI ``class_path`` / ``init_args`` block (nested blocks built first)."""
    module, name = spec["class_path"].rsplit(".", 1)
    arguments = {
        key: _build(value) if isinstance(value, dict) and "class_path" in value else value
        for key, value in (spec.get("init_args") or {}).items()
    }
    return getattr(importlib.import_module(module), name)(**arguments)


def finished(folder: Path) -> bool:
    """Whether a REFINE run folder holds a finished run (its report and its timing are written last)."""
    return (folder / "report.json").is_file() and (folder / "timing.json").is_file()


def load_run(folder: Path) -> dict[str, Any]:
    """The defended classifier of a finished REFINE run and the images it is measured on.

    Returns:
        ``defended``, ``benign`` (the held-out images REFINE never trained on, ``[n, C, H, W]``), ``clean`` (the clean
        test images) and ``triggered`` (the test images whose true class is not the target, with the trigger).
    """
    import json

    config = yaml.safe_load((folder / "config.yaml").read_text())
    data = _build(config["data"])
    data.setup("test")
    report = json.loads((folder / "report.json").read_text())
    attack = attack_from_spec(read_weights_file(report["victim_checkpoint"]).attack_spec)
    test = data.test_set
    clean = torch.stack([test[i][0] for i in range(len(test))])
    keep = (test.labels != attack.target_label).nonzero()[:, 0]
    triggered = attack.apply(clean[keep].clone(), keep)
    benign = torch.stack([data.val_set[i][0] for i in range(len(data.val_set))])
    return {"defended": load_defended(folder / "defended.safetensors"), "benign": benign, "clean": clean,
            "triggered": triggered, "target_label": attack.target_label}  # fmt: skip


def _logits(defended: Any, images: Tensor, batch: int = 500) -> tuple[Tensor, Tensor]:
    victim, out = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            part = images[start : start + batch]
            victim.append(defended.victim(part))
            out.append(defended(part))
    return torch.cat(victim), torch.cat(out)


def run_scores(folder: Path, seed: int, strip: bool = True) -> dict[str, dict[str, Tensor]]:
    """``{score name: {benign, clean, triggered: [N] scores}}`` of one run: every candidate, and STRIP if ``strip``.

    STRIP's N = 100 benign images are drawn from the held-out ones with ``seed``; it costs 100 victim passes per
    image (about 90 s a run on one CPU thread), the candidates one pass of each model.
    """
    run = load_run(folder)
    logits = {part: _logits(run["defended"], run[part]) for part in ("benign", "clean", "triggered")}
    scores = {name: {part: fn(*logits[part]) for part in logits} for name, fn in CANDIDATES.items()}
    # The triggered images on which the victim gives the target: where the backdoor fired, so the two models can
    # disagree at all (on the others the victim itself is not fooled and both give the true class, as on clean ones).
    scores["fired"] = {"triggered": logits["triggered"][0].argmax(1) == run["target_label"]}
    if not strip:
        return scores
    generator = torch.Generator().manual_seed(seed)
    pool = run["benign"][torch.randperm(len(run["benign"]), generator=generator)[:STRIP_REPLICAS]]
    victim = run["defended"].victim
    scores["strip"] = {part: strip_score(victim, run[part], pool) for part in logits}
    return scores


def cached_scores(
    folder: Path, seed: int, cache: Path, strip: bool = True
) -> tuple[dict[str, dict[str, Tensor]], float]:
    """:func:`run_scores`, read from ``cache`` when a previous run stored them; and the seconds they took."""
    import time

    if cache.is_file():
        stored = torch.load(cache, weights_only=True)
        return stored["scores"], float(stored["seconds"])
    start = time.perf_counter()
    scores = run_scores(folder, seed, strip)
    seconds = time.perf_counter() - start
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"scores": scores, "seconds": seconds}, cache)
    return scores, seconds


def measure(scores: dict[str, Tensor], fpr: float, fired: Tensor | None = None) -> dict[str, Any]:
    """The figures of one score: ROC metrics, and the FPR / TPR at its label-free threshold on the benign scores.

    With ``fired`` (``[N1]`` bool over the triggered images: the victim gave the target), also the TPR at 1 % FPR
    and at the threshold over those images only (``tpr_at_1_fired``, ``threshold_tpr_fired``) and their share
    (``victim_asr``).
    """
    threshold = label_free_threshold(scores["benign"], fpr)
    at = rates_at(scores["clean"], scores["triggered"], threshold)
    extra = {}
    if fired is not None:
        hit = scores["triggered"][fired]
        extra = {
            "victim_asr": float(fired.double().mean()),
            "tpr_at_1_fired": detection_metrics(scores["clean"], hit)["tpr_at_1"] if len(hit) else math.nan,
            "threshold_tpr_fired": rates_at(scores["clean"], hit, threshold)["tpr"] if len(hit) else math.nan,
        }
    return {
        **extra,
        **detection_metrics(scores["clean"], scores["triggered"]),
        "threshold": threshold,
        "threshold_fpr": at["fpr"],
        "threshold_tpr": at["tpr"],
        "benign_images": len(scores["benign"]),
        "clean": len(scores["clean"]),
        "triggered": len(scores["triggered"]),
    }


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per attack and detector: mean and worst seed (lowest AUROC / TPR, highest FPR) of every figure."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["attack"], row["detector"]), []).append(row)
    summary = []
    for (attack, detector), group in groups.items():
        entry: dict[str, Any] = {"attack": attack, "detector": detector,
                                 "seeds": " ".join(str(r["seed"]) for r in group)}  # fmt: skip
        for figure in FIGURES:
            values = [r[figure] for r in group]
            entry[figure] = statistics.fmean(values)
            entry[f"{figure}_worst"] = max(values) if figure == "threshold_fpr" else min(values)  # NaN-free: fired
        summary.append(entry)
    return summary


def summary_columns() -> list[str]:
    """Columns of ``detection.csv``."""
    return ["attack", "detector", "seeds", *(f"{f}{suffix}" for f in FIGURES for suffix in ("", "_worst"))]


def write_csv(rows: list[dict[str, Any]], columns: list[str] | tuple[str, ...], path: Path) -> None:
    """``rows`` as CSV with ``columns``; floats with 4 decimals (6 for thresholds), seconds with 1."""

    def cell(column: str, value: Any) -> str:
        if column == "seconds":
            return f"{value:.1f}"
        if column == "threshold":
            return f"{value:.6g}"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([cell(c, row[c]) for c in columns] for row in rows)


def goal_verdicts(summary: list[dict[str, Any]]) -> list[list[str]]:
    """Per attack: whether REFINE's detector meets the goal in every seed, and whether it is ahead of STRIP."""
    by_key = {(e["attack"], e["detector"]): e for e in summary}
    verdicts = []
    for attack in dict.fromkeys(e["attack"] for e in summary):
        refine, strip = by_key.get((attack, "refine")), by_key.get((attack, "strip"))
        if refine is None:
            continue
        met = refine["auroc_worst"] >= GOAL_AUROC and refine["tpr_at_1_worst"] >= GOAL_TPR
        ahead = "-"
        if strip is not None:
            ahead = "yes" if (refine["auroc"], refine["tpr_at_1"]) > (strip["auroc"], strip["tpr_at_1"]) else "no"
        verdicts.append([attack, refine["seeds"], "yes" if met else "no", ahead])
    return verdicts


def markdown(
    summary: list[dict[str, Any]], results_dir: Path, expected_seeds: list[int], fpr: float, attacks: list[str]
) -> str:
    """The table of ``detection.csv`` (:func:`benchmarks.render.detection`), then the goal's verdicts."""
    held = {e["attack"]: e["seeds"].split() for e in summary}
    missing = [f"{a} (has {', '.join(s)})" for a, s in held.items() if len(s) < len(expected_seeds)]
    missing += [f"{a} (none finished)" for a in attacks if a not in held]
    partial = (
        f"**Partial**: not every attack has all seeds {', '.join(map(str, expected_seeds))} yet: {'; '.join(missing)}."
        if missing
        else f"Every attack on seeds {', '.join(map(str, expected_seeds))}."
    )
    goal = (
        f"goal met: REFINE's detector has AUROC >= {GOAL_AUROC} and TPR at 1 % FPR >= {GOAL_TPR} in every seed held. "
        "ahead of STRIP: REFINE's mean AUROC above STRIP's (ties broken by the mean TPR at 1 % FPR)."
    )
    return "\n\n".join([
        render.detection(results_dir),
        partial,
        render.table(["attack", "seeds", "goal met", "ahead of STRIP"], goal_verdicts(summary)),
        goal,
        f"Thresholds chosen at a target FPR of {fpr} on each run's held-out benign images.",
    ])  # fmt: skip


def plot_roc(curves: dict[str, dict[str, dict[str, Tensor]]], path: Path) -> None:
    """ROC curves (log FPR axis) of REFINE's detector and STRIP, one panel per attack (its first seed)."""
    columns = min(4, len(curves))
    rows = math.ceil(len(curves) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(max(6.0, 3.2 * columns), 2.9 * rows), squeeze=False)
    for axis, (attack, scores) in zip(axes.flat, curves.items(), strict=False):
        for detector, label in (("kl_victim_defended", "REFINE (victim vs defended)"), ("strip", "STRIP")):
            part = scores[detector]
            target = torch.cat([torch.zeros(len(part["clean"])), torch.ones(len(part["triggered"]))]).long()
            fpr, tpr, _ = BinaryROC(thresholds=None)(score_ranks(torch.cat([part["clean"], part["triggered"]])), target)
            axis.plot(fpr.clamp(min=1e-3).numpy(), tpr.numpy(), label=label)
        axis.set_xscale("log")
        axis.set_xlim(1e-3, 1)
        axis.set_ylim(0, 1.02)
        axis.axvline(0.01, color="grey", lw=0.6, ls=":")
        axis.set_title(attack, fontsize="small")
        axis.set_xlabel("FPR (clean test images)", fontsize="x-small")
        axis.set_ylabel("TPR (triggered)", fontsize="x-small")
        axis.tick_params(labelsize="x-small")
    for axis in list(axes.flat)[len(curves) :]:
        axis.axis("off")
    axes.flat[0].legend(fontsize="x-small", loc="lower right")
    figure.suptitle("Detecting triggered inputs (MNIST-5k), first seed of each attack", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def table_main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The detection table over the finished runs of ``--run-dir``."""
    rows, curves = [], {}
    for attack in args.attacks:
        for seed in args.seeds:
            folder = args.run_dir / f"{attack}_s{seed}" / "refine"
            if not finished(folder):
                print(f"skipped {attack} seed {seed}: no finished REFINE run in {folder}")
                continue
            scores, seconds = cached_scores(folder, seed, args.cache_dir / f"{attack}_s{seed}.pt")
            curves.setdefault(attack, scores)
            for detector, name in (("refine", "kl_victim_defended"), ("strip", "strip")):
                rows.append({"attack": attack, "seed": seed, "detector": detector, "seconds": seconds,
                             **measure(scores[name], args.fpr, scores["fired"]["triggered"])})  # fmt: skip
            print(f"{attack} seed {seed}: " + ", ".join(f"{r['detector']} AUROC {r['auroc']:.4f}" for r in rows[-2:]))
    if not rows:
        raise SystemExit(f"No finished REFINE run under {args.run_dir} for {args.attacks} and seeds {args.seeds}.")
    summary = aggregate(rows)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, SEED_COLUMNS, args.results_dir / "detection_seeds.csv")
    write_csv(summary, summary_columns(), args.results_dir / "detection.csv")
    text = markdown(summary, args.results_dir, args.seeds, args.fpr, args.attacks)
    (args.results_dir / "detection.md").write_text(text + "\n")
    plot_roc(curves, args.results_dir / "detection_roc.png")
    print(text)
    return summary


def tuning_main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every candidate score and STRIP on the tuning victims' REFINE runs (``<variant>/recipe``)."""
    rows = []
    for folder in sorted(args.run_dir.glob("*/recipe")):
        if not finished(folder):
            continue
        variant = folder.parent.name
        scores, _ = cached_scores(folder, 0, args.cache_dir / f"tuning_{variant}.pt", strip=False)
        fired = scores["fired"]["triggered"]
        rows += [{"variant": variant, "score": name, **measure(scores[name], args.fpr, fired)} for name in CANDIDATES]
        print(f"tuning {variant} done")
    columns = ["variant", "score", *FIGURES]
    summary = []
    for name in CANDIDATES:
        group = [r for r in rows if r["score"] == name]
        mean = {f: statistics.fmean(r[f] for r in group) for f in FIGURES}
        worst = {f: (max if f == "threshold_fpr" else min)(r[f] for r in group) for f in FIGURES}
        summary += [{"variant": "mean", "score": name, **mean}, {"variant": "worst", "score": name, **worst}]
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows + summary, columns, args.results_dir / "detection_tuning.csv")
    text = render.detection_tuning(args.results_dir)
    (args.results_dir / "detection_tuning.md").write_text(text + "\n")
    print(text)
    return summary


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Runs the benchmark with the command line ``argv``; returns the summary rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", nargs="+", default=[*ATTACKS, *ADAPTIVE], help="attacks (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: %(default)s)")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "attacks", help="the REFINE runs (read only)")
    parser.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "detection", help="per-run scores")
    parser.add_argument("--fpr", type=float, default=DEFAULT_FPR, help="target FPR of the label-free thresholds")
    parser.add_argument("--tuning", action="store_true", help="compare candidate scores on runs/tuning instead")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return tuning_main(args) if args.tuning else table_main(args)


if __name__ == "__main__":
    main()
