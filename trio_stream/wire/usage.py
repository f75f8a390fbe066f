"""Token usage: what the upstream reported, or what we counted -- sans-IO.

Every finished run has one :class:`Usage`.  If the upstream reported figures
(an OpenAI-compatible server's ``usage`` chunk, Ollama's ``prompt_eval_count``
and ``eval_count``) they are passed through unchanged; otherwise they are
counted here (docs/api.md section 2.10):

* ``completion_tokens``: the number of chunks the run received that carried
  something (text, reasoning, a tool call, ...; not a bare role or finish
  chunk: :attr:`~trio_stream.core.log.RunLog.deltas`).  Exact for the mock
  upstream, which sends one token per chunk; for a real model it is the
  number of chunks, which is usually one token each.
* ``prompt_tokens``: the characters of the request's message texts (string
  contents, and the ``text`` of content parts), divided by 4, rounded up --
  the usual rule of thumb for English text.  Roles and images count nothing.

A run that ends early (cancelled or failed) never gets the upstream's figures,
since the upstream reports them at its end: its usage is always counted, over
what was received.

This module never imports trio.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Characters per token of the prompt estimate.
CHARS_PER_TOKEN = 4


_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _count(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one run.  ``source`` is ``upstream`` or ``counted``;
    ``extra`` holds every other field of the upstream's usage object
    (``*_details``, OpenRouter's ``cost`` and ``is_byok``, ...), passed
    through as they came."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    source: str = "upstream"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_openai(cls, raw: Any) -> Usage | None:
        """An OpenAI ``usage`` object, or None if it is not a usable one (usage
        is advisory: a malformed one is dropped, never an error)."""
        if not isinstance(raw, dict):
            return None
        prompt, completion = _count(raw.get("prompt_tokens")), _count(raw.get("completion_tokens"))
        if prompt is None or completion is None:
            return None
        total = _count(raw.get("total_tokens"))
        extra = {k: v for k, v in raw.items() if k not in _COUNTS and k != "source"}
        return cls(prompt, completion, prompt + completion if total is None else total,
                   extra=extra)  # fmt: skip

    @classmethod
    def from_ollama(cls, line: Mapping[str, Any]) -> Usage | None:
        """From the last line of Ollama's ``/api/chat`` (``prompt_eval_count``,
        ``eval_count``); None if it has neither."""
        prompt, completion = _count(line.get("prompt_eval_count")), _count(line.get("eval_count"))
        if prompt is None and completion is None:
            return None
        prompt, completion = prompt or 0, completion or 0
        return cls(prompt, completion, prompt + completion)

    def chat(self) -> dict[str, Any]:
        """The chat completions ``usage`` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            **self.extra,
        }

    def responses(self) -> dict[str, Any]:
        """The Responses API ``usage`` object."""
        prompt_details = self.extra.get("prompt_tokens_details")
        completion_details = self.extra.get("completion_tokens_details")
        prompt_details = prompt_details if isinstance(prompt_details, dict) else {}
        completion_details = completion_details if isinstance(completion_details, dict) else {}
        cached = _count(prompt_details.get("cached_tokens")) or 0
        reasoning = _count(completion_details.get("reasoning_tokens")) or 0
        return {
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": self.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": self.total_tokens,
        }

    def record(self) -> dict[str, Any]:
        """What is saved with a message (the ``usage`` column)."""
        return {**self.chat(), "source": self.source}

    @classmethod
    def from_record(cls, raw: Any) -> Usage | None:
        """A saved record back (None for rows saved before usage was kept)."""
        usage = cls.from_openai(raw)
        if usage is None:
            return None
        source = raw.get("source")
        return cls(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens,
                   source if isinstance(source, str) else "upstream", usage.extra)  # fmt: skip


def _texts(content: Any) -> Iterable[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def estimate_prompt(messages: Iterable[Mapping[str, Any]]) -> int:
    """``prompt_tokens`` counted: the messages' text characters / 4, rounded up."""
    chars = sum(len(t) for m in messages for t in _texts(m.get("content")))
    return -(-chars // CHARS_PER_TOKEN)


def settle(
    reported: Usage | None, messages: Iterable[Mapping[str, Any]], deltas: int, *, complete: bool
) -> Usage:
    """A finished run's usage: the upstream's figures for a run that completed
    and got them, else counted over what was received."""
    if reported is not None and complete:
        return reported
    prompt = estimate_prompt(messages)
    return Usage(prompt, deltas, prompt + deltas, "counted")
