"""Plain synchronous tests of the mock upstream's text (trio_stream/upstream/mocktext.py)."""

from __future__ import annotations

import pytest

from trio_stream.upstream import mocktext

MESSAGES = [{"role": "user", "content": "hello"}]


def test_word_index_inverts_word() -> None:
    """word is injective and word_index is its inverse (mocktext rule 3), for
    the first 70,000 integers and around the top of the base range."""
    seen: set[str] = set()
    for n in [*range(70_000), *range((1 << 20) - 10, (1 << 20) + 100)]:
        w = mocktext.word(n)
        assert mocktext.word_index(w) == n
        seen.add(w)
    assert len(seen) == 70_000 + 110


@pytest.mark.parametrize(
    ("n", "w"), [(0, "ba"), (1, "ke"), (15, "pu"), (16, "keba"), (255, "pupu"), (0x1A, "kedo")]
)
def test_word_examples(n: int, w: str) -> None:
    """One syllable per hex digit, most significant first."""
    assert mocktext.word(n) == w


def test_word_rejects_negative() -> None:
    """Negative numbers have no word."""
    with pytest.raises(ValueError, match="non-negative"):
        mocktext.word(-1)


@pytest.mark.parametrize(
    "w",
    ["", "b", "bak", "xx", "babax", "baba", "bake", "Ba", " ba", "ba ", "kebaxx"],
    ids=[
        "empty",
        "half-syllable",
        "odd-length",
        "unknown-syllable",
        "trailing-garbage",
        "leading-zero",
        "leading-zero-2",
        "uppercase",
        "leading-space",
        "trailing-space",
        "bad-last-syllable",
    ],
)
def test_word_index_rejects_non_words(w: str) -> None:
    """Anything that is not exactly word(n) for some n decodes to None, so a
    corrupted token can never pass for a valid one."""
    assert mocktext.word_index(w) is None


@pytest.mark.parametrize(
    ("max_tokens", "count", "reason"),
    [(None, mocktext.DEFAULT_TOKENS, "stop"), (1, 1, "length"), (5, 5, "length")],
    ids=["default", "one", "five"],
)
def test_reply_length_and_finish_reason(max_tokens: int | None, count: int, reason: str) -> None:
    """Without max_tokens: DEFAULT_TOKENS tokens and "stop"; with max_tokens=n:
    exactly n tokens and "length" (mocktext rule 4)."""
    assert mocktext.reply_length(max_tokens) == (count, reason)
    assert len(list(mocktext.tokens(MESSAGES, max_tokens))) == count


def test_tokens_are_consecutive_words_separated_by_one_space() -> None:
    """Token i is word(base + i), with one leading space except the first (rule 2),
    so the text splits back into consecutive indices."""
    toks = list(mocktext.tokens(MESSAGES, 10))
    assert not toks[0].startswith(" ")
    assert all(t.startswith(" ") and not t.startswith("  ") for t in toks[1:])
    text = mocktext.expected_text(MESSAGES, 10)
    assert text == "".join(toks)
    indices = [mocktext.word_index(w) for w in text.split(" ")]
    base = mocktext.prompt_base(MESSAGES)
    assert indices == list(range(base, base + 10))


def test_reply_is_deterministic() -> None:
    """The reply is a pure function of the request (rule 1): equal messages,
    even with keys in another order, give the same text."""
    a = [{"role": "user", "content": "hello"}]
    b = [{"content": "hello", "role": "user"}]
    assert mocktext.expected_text(a, 8) == mocktext.expected_text(b, 8)
    assert mocktext.prompt_base(a) == mocktext.prompt_base(b)


def test_prefix_property() -> None:
    """A shorter max_tokens gives a prefix of a longer one's reply."""
    assert mocktext.expected_text(MESSAGES, 100).startswith(mocktext.expected_text(MESSAGES, 7))


def test_different_prompts_get_different_replies() -> None:
    """Different messages give different bases (checked over 200 prompts),
    and every base is within the documented range."""
    bases = {mocktext.prompt_base([{"role": "user", "content": str(i)}]) for i in range(200)}
    assert len(bases) == 200
    assert all(0 <= b < 1 << 20 for b in bases)
