"""Tests for spielft.demo_data: the built-in ISO-date demo task."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from spielft.data import normalize_records
from spielft.demo_data import (
    DATE_STYLES,
    DEMO_EXTRACTOR,
    TEST_SIZE,
    TRAIN_SIZE,
    demo_dataset,
    extract_iso_date,
    format_date,
)
from spielft.evaluation import exact_match_accuracy

MARCH_5 = dt.date(2021, 3, 5)
EXPECTED_STYLES = {
    "month_day_year": "March 5, 2021",
    "abbr_month_day_year": "Mar 5, 2021",
    "day_month_year": "5 March 2021",
    "day_abbr_month_year": "5 Mar 2021",
    "ordinal_of_month": "the 5th of March, 2021",
    "month_ordinal_year": "March 5th, 2021",
    "us_slash": "03/05/2021 (US)",
    "eu_slash": "05/03/2021 (EU)",
    "dotted": "05.03.2021",
}


def test_every_style_renders_the_date_unambiguously():
    assert set(DATE_STYLES) == set(EXPECTED_STYLES)
    for style, text in EXPECTED_STYLES.items():
        assert format_date(MARCH_5, style) == text
    with pytest.raises(ValueError, match="Unknown date style"):
        format_date(MARCH_5, "klingon")


@pytest.mark.parametrize(
    ("day", "ordinal"),
    [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (12, "12th"), (13, "13th"),
     (21, "21st"), (22, "22nd"), (23, "23rd"), (30, "30th"), (31, "31st")],
)  # fmt: skip
def test_ordinals(day, ordinal):
    assert format_date(dt.date(2000, 1, day), "month_ordinal_year") == f"January {ordinal}, 2000"


def test_splits_sizes_determinism_and_prefixes():
    train, test = demo_dataset("train"), demo_dataset("test")
    assert (len(train), len(test)) == (TRAIN_SIZE, TEST_SIZE)
    assert demo_dataset("train") == train
    assert demo_dataset("train", n=37) == train[:37]
    assert demo_dataset("test", n=500)[:TEST_SIZE] == test
    assert demo_dataset("train", seed=1) != train
    assert demo_dataset("train", n=0) == []


def test_train_and_test_share_no_date():
    train_dates = {r["completion"] for r in demo_dataset("train", n=20000)}
    test_dates = {r["completion"] for r in demo_dataset("test", n=5000)}
    assert not train_dates & test_dates


def test_completions_are_the_iso_form_of_the_prompted_date():
    records = demo_dataset("train", n=600)
    rendered = {style: 0 for style in DATE_STYLES}
    templates = set()
    for record in records:
        date = dt.date.fromisoformat(record["completion"])
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["completion"])
        matches = [s for s in DATE_STYLES if format_date(date, s) in record["prompt"]]
        assert matches, record
        for style in matches:
            rendered[style] += 1
        templates.add(record["prompt"].replace(format_date(date, matches[0]), "{date}"))
        assert extract_iso_date(record["completion"]) == record["completion"]
    assert all(count > 20 for count in rendered.values()), rendered  # every style is used
    assert len(templates) == 6, templates  # and every phrasing


def test_records_are_valid_training_data():
    normalized = normalize_records(demo_dataset("test"))
    assert normalized[0]["messages"][-1]["role"] == "assistant"


def test_answer_extractor():
    assert extract_iso_date("The date is 2021-03-05.") == "2021-03-05"
    assert extract_iso_date("2021-03-05T10:00 or 1999-01-01") == "2021-03-05"
    assert extract_iso_date("2021-3-5") is None
    assert extract_iso_date("12021-03-05") is None
    assert extract_iso_date("March 5, 2021") is None
    result = exact_match_accuracy(
        ["Sure: 2021-03-05", "2021-05-03"], ["2021-03-05"] * 2, DEMO_EXTRACTOR
    )
    assert [r["correct"] for r in result.records] == [True, False]


@pytest.mark.parametrize(("split", "n"), [("validation", None), ("train", -1), ("test", 10**6)])
def test_bad_arguments(split, n):
    with pytest.raises(ValueError, match="demo"):
        demo_dataset(split, n=n)


@pytest.mark.slow
def test_demo_records_fit_max_length_96_with_the_default_tokenizer():
    from spielft.data import tokenize_records
    from spielft.default_model import load_tokenizer

    tokenizer = load_tokenizer()
    records = normalize_records(demo_dataset("train") + demo_dataset("test"))
    _, stats = tokenize_records(records, tokenizer, max_length=96)
    assert stats.num_truncated == 0 and stats.num_dropped == 0


@pytest.mark.slow
def test_default_model_lacks_the_skill():
    """The base model must do badly, or the demo shows no gain (measured: 1/100 correct)."""
    from spielft.default_model import load_model_and_tokenizer
    from spielft.evaluation import evaluate_exact_match

    model, tokenizer = load_model_and_tokenizer()
    result = evaluate_exact_match(
        model, tokenizer, demo_dataset("test", n=40), extractor=DEMO_EXTRACTOR,
        max_new_tokens=24, batch_size=20,
    )  # fmt: skip
    assert result.accuracy <= 0.2
