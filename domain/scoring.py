"""Instrument scoring: BPI-SF severity and interference, FACT-ES subscales and TOI.

Scores are unrounded; a score is None when too few items were answered.
"""

from __future__ import annotations

from collections.abc import Mapping
from statistics import fmean

BPI_PAIN_ITEMS = ("worst", "least", "average", "now")
BPI_INTERFERENCE_ITEMS = (
    "general_activity", "mood", "walking", "work", "relations", "sleep", "enjoyment",
)
BPI_INTERFERENCE_MIN_ANSWERED = 4

FACT_SUBSCALES: dict[str, tuple[str, ...]] = {
    "fact_pwb": tuple(f"GP{i}" for i in range(1, 8)),
    "fact_swb": tuple(f"GS{i}" for i in range(1, 8)),
    "fact_ewb": tuple(f"GE{i}" for i in range(1, 7)),
    "fact_fwb": tuple(f"GF{i}" for i in range(1, 8)),
    "fact_es": tuple(f"ES{i}" for i in range(1, 14)) + ("An9", "O2", "C5", "An10", "Tax1", "BRM1"),
}
FACT_ITEMS = frozenset(item for items in FACT_SUBSCALES.values() for item in items)
FACT_TOI_SUBSCALES = ("fact_pwb", "fact_fwb", "fact_es")
# Negatively worded items are scored as 4 - answer.
FACT_REVERSED = frozenset(
    FACT_SUBSCALES["fact_pwb"] + ("GE1", "GE3", "GE4", "GE5", "GE6") + FACT_SUBSCALES["fact_es"]
)
# FACIT: a total (here the TOI) is valid when more than 80% of its items were answered.
FACT_TOI_MIN_RESPONSE_RATE = 0.8

SCORE_NAMES = (
    "bpi_severity", "bpi_interference",
    "fact_pwb", "fact_swb", "fact_ewb", "fact_fwb", "fact_es", "fact_toi",
)


def bpi_severity(bpi: Mapping[str, object]) -> float | None:
    """Pain severity: the mean of the four pain items (worst, least, average, now), unrounded."""
    values = [bpi.get(item) for item in BPI_PAIN_ITEMS]
    if any(v is None for v in values):
        return None
    return fmean(float(v) for v in values)  # type: ignore[arg-type]


def bpi_interference(bpi: Mapping[str, object]) -> float | None:
    """Pain interference: the mean of the answered interference items, scored when at least
    4 of the 7 are answered."""
    raw = bpi.get("interference") or {}
    if not isinstance(raw, Mapping):
        return None
    answered = [float(raw[i]) for i in BPI_INTERFERENCE_ITEMS if raw.get(i) is not None]
    if len(answered) < BPI_INTERFERENCE_MIN_ANSWERED:
        return None
    return fmean(answered)


def fact_item_score(item: str, answer: int) -> int:
    """The item's contribution: 4 - answer for negatively worded items, else the answer."""
    return 4 - answer if item in FACT_REVERSED else answer


def fact_subscale(name: str, answers: Mapping[str, int]) -> float | None:
    """A subscale score prorated to all its items, when more than half of them are answered."""
    items = FACT_SUBSCALES[name]
    scored = [fact_item_score(i, answers[i]) for i in items if answers.get(i) is not None]
    if len(scored) * 2 <= len(items):
        return None
    return sum(scored) * len(items) / len(scored)


def fact_scores(answers: Mapping[str, int]) -> dict[str, float | None]:
    """FACT-ES subscales and the Trial Outcome Index (PWB + FWB + ES, 0-132)."""
    scores = {name: fact_subscale(name, answers) for name in FACT_SUBSCALES}
    toi_items = [i for s in FACT_TOI_SUBSCALES for i in FACT_SUBSCALES[s]]
    answered = sum(1 for i in toi_items if answers.get(i) is not None)
    parts = [scores[s] for s in FACT_TOI_SUBSCALES]
    toi_valid = answered > FACT_TOI_MIN_RESPONSE_RATE * len(toi_items)
    scores["fact_toi"] = (
        sum(p for p in parts if p is not None)
        if toi_valid and all(p is not None for p in parts) else None
    )
    return scores


def visit_scores(
    bpi: Mapping[str, object] | None, fact: Mapping[str, int] | None
) -> dict[str, float | None]:
    """All score names for one visit; None where the instrument is absent or too sparse."""
    scores: dict[str, float | None] = dict.fromkeys(SCORE_NAMES)
    if bpi:
        scores["bpi_severity"] = bpi_severity(bpi)
        scores["bpi_interference"] = bpi_interference(bpi)
    if fact:
        scores.update(fact_scores(fact))
    return scores
