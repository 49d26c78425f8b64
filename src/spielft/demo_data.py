"""The built-in demo task: rewrite a written date in ISO 8601 form (``YYYY-MM-DD``).

Why this task: the base model (SmolLM2-135M-Instruct) does it badly (it tends to echo the input
or to get month numbers, zero-padding and US/EU day order wrong), yet it is cheap to learn (a
dozen month names, ordinals, and a few field orders) and the answer can be checked exactly. So a
few hundred sparse fine-tuning steps on a CPU show a clear before/after gain in exact match.

Records are generated deterministically from a seed, so nothing is downloaded. The train and test
splits use disjoint sets of dates, and asking for fewer records returns a prefix of the full
split, so ``n`` never changes which record comes first.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from collections.abc import Callable
from functools import lru_cache

__all__ = [
    "DATE_STYLES",
    "DEMO_EXTRACTOR",
    "DEMO_MAX_NEW_TOKENS",
    "DEMO_TASK",
    "SPLITS",
    "TEST_SIZE",
    "TRAIN_SIZE",
    "demo_dataset",
    "extract_iso_date",
    "format_date",
]

DEMO_TASK = "Rewrite a written date (varied styles) in ISO 8601 form, YYYY-MM-DD."
DEMO_EXTRACTOR = "iso_date"
"""Name of the answer extractor to score this task with (see ``spielft.evaluation``)."""
DEMO_MAX_NEW_TOKENS = 16
"""Enough new tokens for an ISO date plus the end-of-turn token."""
TRAIN_SIZE = 2000
TEST_SIZE = 200
SPLITS = ("train", "test")

_FIRST_DAY = dt.date(1900, 1, 1)
_LAST_DAY = dt.date(2099, 12, 31)
# The first _TEST_POOL dates of the seeded shuffle are reserved for the test split.
_TEST_POOL = 5000
_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_TEMPLATES = (
    "Convert to ISO 8601: {date}",
    "Write {date} in ISO 8601 format (YYYY-MM-DD).",
    "What is {date} in YYYY-MM-DD format?",
    "Normalize this date to ISO 8601: {date}",
    "Date: {date}\nISO 8601:",
    'Rewrite the date "{date}" as YYYY-MM-DD.',
)


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


DATE_STYLES: dict[str, Callable[[dt.date], str]] = {
    "month_day_year": lambda d: f"{_MONTHS[d.month - 1]} {d.day}, {d.year}",
    "abbr_month_day_year": lambda d: f"{_MONTHS[d.month - 1][:3]} {d.day}, {d.year}",
    "day_month_year": lambda d: f"{d.day} {_MONTHS[d.month - 1]} {d.year}",
    "day_abbr_month_year": lambda d: f"{d.day} {_MONTHS[d.month - 1][:3]} {d.year}",
    "ordinal_of_month": lambda d: f"the {_ordinal(d.day)} of {_MONTHS[d.month - 1]}, {d.year}",
    "month_ordinal_year": lambda d: f"{_MONTHS[d.month - 1]} {_ordinal(d.day)}, {d.year}",
    "us_slash": lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (US)",
    "eu_slash": lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (EU)",
    "dotted": lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
}
"""How a date can be written in a prompt; every style is unambiguous."""


def format_date(date: dt.date, style: str) -> str:
    """``date`` written in one of :data:`DATE_STYLES`."""
    try:
        return DATE_STYLES[style](date)
    except KeyError:
        raise ValueError(
            f"Unknown date style {style!r}; choose from {list(DATE_STYLES)}."
        ) from None


@lru_cache(maxsize=4)
def _shuffled_days(seed: int) -> tuple[int, ...]:
    days = list(range((_LAST_DAY - _FIRST_DAY).days + 1))
    random.Random(f"spielft-demo-dates:{seed}").shuffle(days)
    return tuple(days)


def demo_dataset(split: str = "train", n: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """``n`` demo records ``{"prompt", "completion"}`` (default 2000 train / 200 test).

    The completion is the bare ISO date, e.g. ``{"prompt": "Convert to ISO 8601: March 5, 2021",
    "completion": "2021-03-05"}``. Same ``split``/``seed`` give the same records; a smaller ``n``
    gives a prefix; train and test never share a date.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown demo split {split!r}; choose one of {list(SPLITS)}.")
    days = _shuffled_days(seed)
    pool = days[:_TEST_POOL] if split == "test" else days[_TEST_POOL:]
    if n is None:
        n = TEST_SIZE if split == "test" else TRAIN_SIZE
    if not 0 <= n <= len(pool):
        raise ValueError(
            f"The demo {split} split has between 0 and {len(pool)} records; got n={n}."
        )
    rng = random.Random(f"spielft-demo:{seed}:{split}")
    styles = list(DATE_STYLES)
    records = []
    for offset in pool[:n]:
        date = _FIRST_DAY + dt.timedelta(days=offset)
        style, template = rng.choice(styles), rng.choice(_TEMPLATES)
        records.append(
            {
                "prompt": template.format(date=format_date(date, style)),
                "completion": date.isoformat(),
            }
        )
    return records


_ISO_DATE_RE = re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)")


def extract_iso_date(text: str) -> str | None:
    """The first ``YYYY-MM-DD`` in ``text`` (the answer extractor of the demo task), or None."""
    match = _ISO_DATE_RE.search(text)
    return "-".join(match.groups()) if match else None
