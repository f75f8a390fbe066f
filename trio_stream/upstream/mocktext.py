"""The built-in mock upstream's reply: a pure function of the request.

Rules (docs/api.md section 5):

1. The reply to a request is fixed by its ``messages`` and ``max_tokens``.
2. Token ``i`` is ``word(base + i)``, preceded by one space unless ``i == 0``.
   ``base`` is derived from a hash of the messages, so different prompts get
   different replies.
3. ``word`` is injective: every integer maps to a distinct pronounceable word
   and :func:`word_index` maps it back.  A client can therefore split the text
   it received on spaces, decode each word to its index, and tell a lost
   token (a gap), a repeated one (an index seen twice) and a reordered one
   (an index smaller than its predecessor) apart -- however the server
   coalesced tokens into events.
4. Without ``max_tokens`` the reply has :data:`DEFAULT_TOKENS` tokens and ends
   with ``finish_reason="stop"``.  With ``max_tokens=n`` it has exactly ``n``
   tokens and ends with ``"length"``, as a real model cut off by the limit.

This module never imports trio.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import orjson

DEFAULT_TOKENS = 64

# Sixteen syllables: one per hex digit.  Consonant-vowel pairs keep the words
# readable, and no syllable is a prefix of another, so decoding is unique.
_SYLLABLES = (
    "ba", "ke", "lo", "mi", "nu", "ra", "se", "ti",
    "vo", "za", "do", "fe", "gu", "ho", "ji", "pu",
)  # fmt: skip
_INDEX = {s: i for i, s in enumerate(_SYLLABLES)}
# str.translate table: hex digit -> its syllable (one C call per word).
_BY_HEX = str.maketrans(dict(zip("0123456789abcdef", _SYLLABLES, strict=True)))
_BASE_RANGE = 1 << 20


def word(n: int) -> str:
    """The word for the non-negative integer ``n`` (one syllable per hex digit)."""
    if n < 0:
        raise ValueError("n must be non-negative")
    return format(n, "x").translate(_BY_HEX)


def word_index(w: str) -> int | None:
    """Invert :func:`word`; ``None`` if ``w`` is not a word of the mock."""
    if not w or len(w) % 2:
        return None
    digits = []
    for i in range(0, len(w), 2):
        d = _INDEX.get(w[i : i + 2])
        if d is None:
            return None
        digits.append(d)
    if len(digits) > 1 and digits[0] == 0:
        return None  # non-canonical (leading zero)
    value = 0
    for d in digits:
        value = value * 16 + d
    return value


def prompt_base(messages: Sequence[Any]) -> int:
    """The first word's number for a conversation: a stable hash of its messages."""
    digest = hashlib.blake2b(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS), digest_size=8)
    return int.from_bytes(digest.digest(), "big") % _BASE_RANGE


def reply_length(max_tokens: int | None) -> tuple[int, str]:
    """How many tokens the mock answers, and its ``finish_reason``."""
    if max_tokens is None:
        return DEFAULT_TOKENS, "stop"
    return max_tokens, "length"


def tokens(messages: Sequence[Any], max_tokens: int | None = None) -> Iterator[str]:
    """The reply's tokens, in order.  ``"".join(tokens(...))`` is the full text."""
    base = prompt_base(messages)
    count, _ = reply_length(max_tokens)
    for i in range(count):
        yield word(base + i) if i == 0 else " " + word(base + i)


def expected_text(messages: Sequence[Any], max_tokens: int | None = None) -> str:
    """The complete reply text the mock gives for this request."""
    return "".join(tokens(messages, max_tokens))
