import pytest

from domain.scoring import (
    FACT_SUBSCALES,
    bpi_interference,
    bpi_severity,
    fact_item_score,
    fact_scores,
    fact_subscale,
    visit_scores,
)


def test_bpi_severity_is_the_unrounded_mean_of_the_four_pain_items():
    assert bpi_severity({"worst": 7, "least": 2, "average": 4, "now": 4}) == 4.25


def test_bpi_severity_needs_all_four_pain_items():
    assert bpi_severity({"worst": 7, "least": 2, "average": 4}) is None


def test_bpi_interference_is_scored_when_four_of_seven_are_answered():
    answers = {"mood": 2, "sleep": 3, "work": 4, "walking": 6}
    assert bpi_interference({"interference": answers}) == 3.75


def test_bpi_interference_is_not_scored_with_three_answers():
    answers = {"mood": 2, "sleep": 3, "work": 4}
    assert bpi_interference({"interference": answers}) is None


@pytest.mark.parametrize(("item", "answer", "score"), [
    ("GP1", 3, 1), ("GS1", 3, 3), ("GE1", 3, 1), ("GE2", 3, 3), ("GE3", 3, 1),
    ("GE6", 3, 1), ("GF1", 3, 3), ("ES1", 3, 1), ("BRM1", 3, 1), ("Tax1", 0, 4),
])
def test_negatively_worded_items_are_reversed(item, answer, score):
    assert fact_item_score(item, answer) == score


def test_a_complete_subscale_is_the_sum_of_item_scores():
    answers = {item: 1 for item in FACT_SUBSCALES["fact_pwb"]}  # each scores 4 - 1 = 3
    assert fact_subscale("fact_pwb", answers) == 21


def test_a_subscale_is_prorated_when_more_than_half_is_answered():
    answers = {"GF1": 4, "GF2": 4, "GF3": 2, "GF4": 2}  # 4 of 7: sum 12, prorated * 7/4
    assert fact_subscale("fact_fwb", answers) == 21.0


def test_a_subscale_with_half_or_fewer_answered_is_not_scored():
    assert fact_subscale("fact_fwb", {"GF1": 4, "GF2": 4, "GF3": 2}) is None  # 3 of 7
    assert fact_subscale("fact_ewb", {"GE1": 1, "GE2": 1, "GE3": 1}) is None  # 3 of 6
    # GE1, GE3, GE4 reversed (3 each), GE2 not (1): 10 prorated by 6/4
    assert fact_subscale("fact_ewb", {"GE1": 1, "GE2": 1, "GE3": 1, "GE4": 1}) == 15.0


def test_toi_is_pwb_plus_fwb_plus_es_and_spans_0_to_132():
    best = {i: 0 for i in FACT_SUBSCALES["fact_pwb"] + FACT_SUBSCALES["fact_es"]}
    best.update({i: 4 for i in FACT_SUBSCALES["fact_fwb"]})
    assert fact_scores(best)["fact_toi"] == 132
    worst = {i: 4 - v for i, v in best.items()}
    assert fact_scores(worst)["fact_toi"] == 0
    assert len(FACT_SUBSCALES["fact_es"]) == 19


def test_toi_is_not_scored_when_80_percent_or_fewer_of_its_items_are_answered():
    items = FACT_SUBSCALES["fact_pwb"] + FACT_SUBSCALES["fact_fwb"] + FACT_SUBSCALES["fact_es"]
    answered = {i: 2 for i in items[: int(0.8 * len(items))]}  # 26 of 33: every subscale valid
    scores = fact_scores(answered)
    assert scores["fact_pwb"] is not None and scores["fact_es"] is not None
    assert scores["fact_toi"] is None
    answered = {i: 2 for i in items[:27]}
    assert fact_scores(answered)["fact_toi"] is not None


def test_visit_scores_name_every_score_even_without_instruments():
    scores = visit_scores(None, None)
    assert set(scores) == {"bpi_severity", "bpi_interference", "fact_pwb", "fact_swb",
                           "fact_ewb", "fact_fwb", "fact_es", "fact_toi"}
    assert all(v is None for v in scores.values())
