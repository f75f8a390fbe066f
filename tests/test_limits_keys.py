"""The ``[[key]]`` table, the rate-limit headers and the 429 answers:
pure functions, tested synchronously."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from trio_stream.errors import ConfigError
from trio_stream.http.limits import limits_unavailable, model_not_allowed, refusal
from trio_stream.limits import Limits, Verdict, Window
from trio_stream.limits.headers import duration, rate_headers
from trio_stream.limits.keys import KeyDef, digest_of, parse_keys

SHA = hashlib.sha256(b"s2").hexdigest()


def test_a_full_key_table_is_parsed() -> None:
    """Every field is read into its typed place; the secret is kept only as its
    SHA-256, and ``sha256 =`` gives the same key as the secret itself."""
    keys = parse_keys(
        [
            {"name": "alice", "secret": "s1", "tenant": "acme", "rpm": 60, "tpm": 1000,
             "max_streams": 2, "tokens_per_day": 10, "tokens_per_month": 100,
             "models": ["a", "b"]},
            {"name": "bob", "sha256": SHA.upper()},
        ]
    )  # fmt: skip
    alice, bob = keys
    assert alice.digest == digest_of("s1")
    assert alice.tenant == "acme"
    assert alice.limits == Limits(60, 1000, 2, 10, 100)
    assert alice.allows("a")
    assert not alice.allows("c")
    assert bob.digest == digest_of("s2")
    assert bob.tenant == "bob"
    assert bob.limits == Limits()
    assert not bob.limits.limited
    assert bob.allows("anything")
    assert "s1" not in repr(alice)
    assert alice.digest.hex() not in repr(alice)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"secret": "s"}, "key 1: name must be"),
        ({"name": "a b", "secret": "s"}, "key 1 ('a b'): name must be"),
        ({"name": "a"}, "key 1 ('a'): give exactly one of secret and sha256"),
        ({"name": "a", "secret": "s", "sha256": SHA}, "give exactly one"),
        ({"name": "a", "secret": " s"}, "secret must be non-empty"),
        ({"name": "a", "sha256": "abc"}, "sha256 must be 64 hexadecimal digits"),
        ({"name": "a", "secret": "s", "rpm": 0}, "key 1 ('a'): rpm must be a whole number >= 1"),
        ({"name": "a", "secret": "s", "tpm": 1.5}, "tpm must be a whole number"),
        ({"name": "a", "secret": "s", "max_streams": True}, "max_streams must be a whole"),
        ({"name": "a", "secret": "s", "tenant": "k_x"}, "tenant must be"),
        ({"name": "a", "secret": "s", "models": []}, "models must be a non-empty list"),
        ({"name": "a", "secret": "s", "rmp": 1}, "unknown field 'rmp'"),
    ],
)
def test_a_bad_key_is_refused_naming_its_number_and_field(
    table: dict[str, object], message: str
) -> None:
    """Each invalid field is refused with the key's number and the field's name."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_keys([table])


def test_every_problem_of_the_file_is_named_at_once() -> None:
    """Problems of several keys, and names or secrets given twice, are all
    named in one error (the file is refused whole)."""
    with pytest.raises(ConfigError) as caught:
        parse_keys(
            [
                {"name": "a", "secret": "s"},
                {"name": "a", "secret": "t", "rpm": -1},
                {"name": "b", "secret": "s"},
                {"name": "c", "sha256": hashlib.sha256(b"t").hexdigest()},
                "x",
            ]
        )
    text = str(caught.value)
    assert "key 2 ('a'): rpm must be" in text
    assert "key 3 ('b'): its secret is also key 1's" in text
    assert "key 5: must be a table" in text
    with pytest.raises(ConfigError, match="name is also key 1's"):
        parse_keys([{"name": "a", "secret": "s"}, {"name": "a", "secret": "t"}])
    with pytest.raises(ConfigError, match="array of tables"):
        parse_keys({"name": "a"})


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (-1, "0s"), (0.0201, "21ms"), (1, "1s"), (1.25, "1.25s"), (59.9999, "1m0s"),
     (360, "6m0s"), (61.5, "1m1.5s"), (3723, "1h2m3s")],
)  # fmt: skip
def test_durations_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    """``x-ratelimit-reset-*`` durations: ms below a second, else h/m/s."""
    assert duration(seconds) == text


def test_headers_of_an_admitted_and_a_refused_verdict() -> None:
    """Each rate the key has gets its three headers; only a refusal for a
    rate adds ``retry-after`` (rounded up to whole seconds) and its ms twin."""
    admitted = Verdict(None, 0.0, Window(60, 59, 60.0), None)
    assert rate_headers(admitted) == (
        (b"x-ratelimit-limit-requests", b"60"),
        (b"x-ratelimit-remaining-requests", b"59"),
        (b"x-ratelimit-reset-requests", b"1m0s"),
    )
    refused = Verdict("tokens", 12.2, Window(60, 10, 30.5), Window(1000, 0, 59.0))
    assert dict(rate_headers(refused)) == {
        b"x-ratelimit-limit-requests": b"60",
        b"x-ratelimit-remaining-requests": b"10",
        b"x-ratelimit-reset-requests": b"30.5s",
        b"x-ratelimit-limit-tokens": b"1000",
        b"x-ratelimit-remaining-tokens": b"0",
        b"x-ratelimit-reset-tokens": b"59s",
        b"retry-after": b"13",
        b"retry-after-ms": b"12200",
    }
    assert rate_headers(Verdict(None, 0.0, None, None)) == ()


KEY = KeyDef("alice", digest_of("s"), "acme", Limits(rpm=60, tpm=100, max_streams=2,
             tokens_per_month=5), None)  # fmt: skip


def test_refusals_are_openai_429s() -> None:
    """Requests and tokens: 429 ``rate_limit_exceeded`` typed by the rate, with
    ``retry-after``; streams: ``too_many_streams``; a spent budget:
    ``insufficient_quota`` with ``x-should-retry: false``; all carry the
    key's rate headers, none names the secret."""
    window = Window(60, 0, 30.0)
    requests = refusal(KEY, Verdict("requests", 2.5, window, None))
    assert (requests.status, requests.type, requests.code) == (
        429,
        "requests",
        "rate_limit_exceeded",
    )
    assert dict(requests.headers)[b"retry-after"] == b"3"
    assert dict(requests.headers)[b"x-ratelimit-remaining-requests"] == b"0"
    assert refusal(KEY, Verdict("tokens", 1.0, None, window)).type == "tokens"
    streams = refusal(KEY, Verdict("streams", 0.0, window, None))
    assert (streams.status, streams.code) == (429, "too_many_streams")
    assert dict(streams.headers)[b"retry-after"] == b"1"
    budget = refusal(KEY, Verdict("budget", 0.0, window, None))
    assert (budget.status, budget.type, budget.code) == (
        429, "insufficient_quota", "insufficient_quota",
    )  # fmt: skip
    assert dict(budget.headers)[b"x-should-retry"] == b"false"
    assert b"retry-after" not in dict(budget.headers)
    body = orjson.loads(budget.body())
    assert body["error"]["code"] == "insufficient_quota"
    assert "month" in body["error"]["message"]


def test_outage_and_model_answers() -> None:
    """Closed on outage: 503 ``limits_unavailable`` with ``Retry-After: 1``; a
    model the key may not use: OpenAI's 404 ``model_not_found``."""
    outage = limits_unavailable()
    assert (outage.status, outage.code, dict(outage.headers)[b"retry-after"]) == (
        503, "limits_unavailable", b"1",
    )  # fmt: skip
    model = model_not_allowed("gpt-x")
    assert (model.status, model.code) == (404, "model_not_found")
