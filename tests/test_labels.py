"""Text labels of a checkpoint's completion: each label means something measurable."""

from __future__ import annotations

import random

from coordinator.evaluate import label_text


def tokens_of(text: str) -> list[int]:
    return [ord(c) for c in text]  # any stable id per character will do for the loop check


def test_an_empty_completion_is_empty() -> None:
    assert label_text("   \n", tokens_of("   \n")) == "empty"


def test_filler_whitespace_is_whitespace_collapse() -> None:
    text = "    ,   .\n\n\n\n\n\n\n\n\n"
    assert label_text(text, tokens_of(text)) == "whitespace collapse"


def test_a_short_cycle_at_the_tail_is_a_repetition_loop() -> None:
    tokens = [5, 6] * 12
    assert label_text(" , and, and, and, and, and, and, and, and", tokens) == "repetition loop"


def test_plain_prose_with_numbers_is_coherent() -> None:
    text = " Paris.\n\nThe answer is: 2018-01-22 12:1"
    assert label_text(text, tokens_of(text)) == "coherent"


def test_random_bytes_are_other_not_coherent() -> None:
    rng = random.Random(0)
    text = bytes(rng.randrange(256) for _ in range(60)).decode("utf-8", errors="replace")
    assert label_text(text, tokens_of(text)) == "other"


def test_consonant_soup_is_other() -> None:
    text = "xkcd brr pfft grr zzt qrst wxyz"
    assert label_text(text, tokens_of(text)) == "other"
