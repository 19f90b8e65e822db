"""The one table of metric names: every rate refine-pl measures, every classifier it measures, and their keys.

The modules log ``<stage>/<prefix><rate>`` (``test/ba``, ``test/victim_asr``, ``val/clean_ra``, ``test/der``);
``report.json`` holds one object per classifier row (``no_defense``, ``defended``, ``clean_floor``) with one
field per rate. Everything that writes or reads those keys (the modules, the report, the callbacks, the pipeline
and the benchmarks) takes them from here.
"""

from dataclasses import dataclass

BA = "ba"
ASR = "asr"
ANY_CLASS_ASR = "any_class_asr"
RA = "ra"
DER = "der"
AGREEMENT = "agreement"

RATES: dict[str, str] = {
    BA: "benign accuracy: share of the clean test images classified as their true class",
    ASR: "attack success rate: share of the triggered test images whose true class is not the target that are "
    "classified as the target",
    ANY_CLASS_ASR: "any-class attack success rate: over the triggered test images, the largest share that any one "
    "class c receives among those whose true class is not c; a defense that moves the target class elsewhere (as "
    "REFINE's remap does) while the trigger still works shows here, where the ASR reads 0",
    RA: "robust accuracy: share of those triggered images classified as their true class",
    DER: "defense effectiveness rating (BackdoorBench): (max(0, ASR drop) - max(0, BA drop) + 1) / 2 against the "
    "victim, in [0, 1]; 0.5 means nothing removed and nothing lost",
    AGREEMENT: "label-free agreement: share of held-out unlabeled images on which the defended classifier gives the "
    "victim's class; without reading a label it estimates the defended BA relative to the victim's",
}
"""Every rate, by key, with its meaning."""

RATE_LABELS: dict[str, str] = {BA: "BA", ASR: "ASR", ANY_CLASS_ASR: "any-class ASR", RA: "RA", DER: "DER"}
"""Every rate's name in tables."""

MEASURED_RATES = (BA, ASR, ANY_CLASS_ASR, RA)
"""The rates measured for each classifier; DER compares two classifiers and belongs to the defended one."""

LABEL_FREE = "label_free"
"""Key of the label-free estimate in checkpoints and ``report.json``: the :data:`AGREEMENT` of the defended
classifier with the victim on the held-out unlabeled images at the last validation (``val/agreement`` in the
logs and the progress bar), with how many images and at which epoch."""

FINDINGS = "findings"
"""Key in ``report.json`` of what a defense itself found about the victim
(:meth:`~refine_pl.DefendedLitModule.findings`: Neural Cleanse's flagged classes, anomaly indices and mask norms), with
a ``summary`` sentence that the report's markdown repeats; null for a defense that finds nothing of its own."""


@dataclass(frozen=True)
class ClassifierRow:
    """A classifier measured in the same test pass, as a row of the report.

    Attributes:
        key: The row's field in ``report.json``.
        prefix: What its logged keys carry between the stage and the rate.
        rates: The rates the row holds.
        label: The row's name in tables.
        meaning: What the classifier is.
    """

    key: str
    prefix: str
    rates: tuple[str, ...]
    label: str
    meaning: str

    def logged(self, stage: str, rate: str) -> str:
        """The key under which ``rate`` of this classifier is logged in ``stage`` (``val`` or ``test``)."""
        return f"{stage}/{self.prefix}{rate}"


NO_DEFENSE = ClassifierRow("no_defense", "victim_", MEASURED_RATES, "no defense", "the suspect model alone")
DEFENDED = ClassifierRow(
    "defended",
    "",
    (*MEASURED_RATES, DER),
    "defended",
    "the defended classifier (a victim job: the trained model itself); its DER is taken against the victim",
)
CLEAN_FLOOR = ClassifierRow(
    "clean_floor",
    "clean_",
    MEASURED_RATES,
    "clean model (ASR floor)",
    "a model trained like the victim without the attack: its ASR is the floor below which no defense can bring an ASR",
)

REPORT_ROWS = (NO_DEFENSE, DEFENDED, CLEAN_FLOOR)
"""The classifier rows of a defense's report, in the order of its table."""
