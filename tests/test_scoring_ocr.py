"""OCR metric (Flow-GRPO rule) on hand-made strings; expected values worked out in comments."""

from __future__ import annotations

import pytest

from opdkit.scoring.ocr import levenshtein, normalize_ocr_text, ocr_reward, ocr_target


def test_ocr_target_first_pair_of_quotes() -> None:
    prompt = 'A storefront with "Hello World" on the door and "Open 24h" in the window'
    assert ocr_target(prompt) == "Hello World"
    assert ocr_target('a sign that says "K7"') == "K7"
    # Text is returned verbatim (case, inner spaces); normalisation happens in ocr_reward.
    assert ocr_target('say " Mixed  Case "') == " Mixed  Case "


@pytest.mark.parametrize("prompt", ["no quotes here", 'an unclosed "quote', ""])
def test_ocr_target_needs_a_pair(prompt: str) -> None:
    with pytest.raises(ValueError, match="double quotes"):
        ocr_target(prompt)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("", "abc", 3),
        ("abc", "", 3),
        ("abc", "abc", 0),
        ("", "", 0),
    ],
)
def test_levenshtein_known_values(a: str, b: str, expected: int) -> None:
    assert levenshtein(a, b) == expected
    assert levenshtein(b, a) == expected  # symmetric


def test_exact_case_and_spaces() -> None:
    assert ocr_reward("Hello World", "Hello World") == 1.0
    # Spaces removed and lowercased on BOTH sides: "helloworld" == "helloworld".
    assert ocr_reward("HELLOWORLD", "hello world") == 1.0
    assert ocr_reward("h e l l o", "Hello") == 1.0


def test_substring_costs_nothing() -> None:
    # "welcome!helloworld2024" contains "helloworld" -> distance 0.
    assert ocr_reward("Welcome! Hello World 2024", "Hello World") == 1.0


def test_partial_match() -> None:
    # "heloworld" vs "helloworld": one insertion -> 1 - 1/10 = 0.9.
    assert ocr_reward("Helo World", "Hello World") == pytest.approx(0.9)
    # "spring" vs "springcollection2024" (len 20): 14 insertions -> 1 - 14/20 = 0.3.
    assert ocr_reward("Spring", "Spring Collection 2024") == pytest.approx(0.3)


def test_distance_capped_at_target_length() -> None:
    # 20 unrelated characters vs "abc": Levenshtein 20 > 3 -> capped at 3 -> reward 0, not -5.67.
    assert levenshtein("x" * 20, "abc") == 20
    assert ocr_reward("x" * 20, "abc") == 0.0


def test_empty_recognised_text_scores_zero() -> None:
    # "" vs "k7": distance 2 = len -> 0.0.
    assert ocr_reward("", "K7") == 0.0


def test_length_is_measured_without_spaces() -> None:
    # Target "a b" -> "ab" (length 2); recognised "a": distance 1 -> 1 - 1/2 = 0.5
    # (counting the space the length would be 3 and the reward 2/3).
    assert ocr_reward("a", "a b") == pytest.approx(0.5)


def test_only_ascii_spaces_are_removed() -> None:
    # A newline is kept: "hello\nworld" vs "helloworld" -> one deletion -> 1 - 1/10 = 0.9.
    assert normalize_ocr_text("Hello\nWorld") == "hello\nworld"
    assert ocr_reward("Hello\nWorld", "Hello World") == pytest.approx(0.9)


@pytest.mark.parametrize("target", ["", "   "])
def test_empty_target_is_an_error(target: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        ocr_reward("anything", target)
