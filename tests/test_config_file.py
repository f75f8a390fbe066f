"""Plain synchronous tests of the configuration file (trio_stream/config/file.py,
trio_stream/config/members.py) and of ``serve --config`` (trio_stream/cli.py)."""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

import click
import pytest

from trio_stream import cli
from trio_stream.config import Settings
from trio_stream.config.file import SECTIONS, load, parse, serve_keys
from trio_stream.config.members import ANY_MODEL, GroupSpec, MemberSpec, ModelName, Upstreams
from trio_stream.errors import ConfigError

EXAMPLE = """
[serve]
port = 9000
first_token_timeout = 20
api_keys = ["k1", "k2"]
coalesce = false

[[upstream]]
name = "vllm-a"
kind = "openai"
url = "http://10.0.0.1:8000/v1"
api_key_env = "VLLM_KEY"
models = ["llama3", { name = "gpt-4o", upstream = "openai/gpt-4o" }]
weight = 2
max_streams = 50
first_token_timeout = 5

[[upstream]]
name = "local"
kind = "ollama"
url = "http://127.0.0.1:11434"
models = ["llama3"]
cool_after_failures = 3
cooldown_ms = 500
max_cooldown_ms = 8000
probe = true
probe_interval_ms = 250

[[upstream]]
name = "sim"
kind = "mock"
mock_delay_ms = 0

[group."llama3"]
hedge_after_ms = 200
"""


@pytest.fixture(autouse=True)
def no_trio_stream_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' own environment never reaches the options under test."""
    for name in list(os.environ):
        if name.startswith("TRIO_STREAM_"):
            monkeypatch.delenv(name)


def problems(text: str, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, "config.toml", environ or {})
    return str(info.value)


def test_the_example_file() -> None:
    """Every key of docs/api.md section 1.3's shape lands in its typed field:
    models renamed or not, a key read from its environment variable, a
    member without models serving any, the group's hedge."""
    config = parse(EXAMPLE, "config.toml", {"VLLM_KEY": "secret"})
    assert config.path == "config.toml"
    assert config.serve == {
        "port": 9000, "first_token_timeout": 20.0, "api_keys": ("k1", "k2"), "coalesce": False,
    }  # fmt: skip
    a, local, sim = config.upstreams.members if config.upstreams else ()
    assert a == MemberSpec(
        "vllm-a", "openai", "http://10.0.0.1:8000/v1", "secret",
        (ModelName("llama3", "llama3"), ModelName("gpt-4o", "openai/gpt-4o")),
        weight=2.0, max_streams=50, first_token_timeout=5.0,
    )  # fmt: skip
    assert isinstance(a.weight, float)
    assert isinstance(a.first_token_timeout, float)
    assert (local.kind, local.cool_after_failures, local.cooldown_ms) == ("ollama", 3, 500.0)
    assert (local.probe, local.probe_interval_ms) == (True, 250.0)
    assert (a.probe, a.probe_interval_ms) == (False, 1000.0)
    assert sim.models == (ModelName(ANY_MODEL, ANY_MODEL),)
    assert sim.mock_delay_ms == 0.0
    assert config.upstreams is not None
    assert config.upstreams.groups == (GroupSpec("llama3", 200.0),)
    assert config.upstreams.group("gpt-4o") == GroupSpec("gpt-4o", None)
    assert a.upstream_model("gpt-4o") == "openai/gpt-4o"
    assert a.upstream_model("other") is None
    assert sim.upstream_model("other") == "other"


def test_an_api_key_is_not_in_the_repr() -> None:
    """A member's key does not show in its repr (nor in Settings' repr, so
    never in a log line or a traceback)."""
    config = parse(EXAMPLE, "config.toml", {"VLLM_KEY": "secret"})
    assert "secret" not in repr(config.upstreams)
    assert "secret" not in repr(Settings(upstreams=config.upstreams))


def test_a_file_without_upstream_tables_keeps_the_shorthand() -> None:
    """A file of only [serve] sets no members; [serve] may then hold the
    one-upstream shorthand's options."""
    config = parse('[serve]\nupstream = "openai"\nupstream_url = "http://h/v1"\n', "c.toml", {})
    assert config.upstreams is None
    assert config.serve == {"upstream": "openai", "upstream_url": "http://h/v1"}


def test_the_shorthand_is_one_member_serving_every_model_that_never_cools() -> None:
    """Without [[upstream]], Settings.members() is the --upstream member:
    named after its kind, any model, cool_after_failures 0 (router rule H5)."""
    settings = Settings(upstream="openai", upstream_url="http://h/v1", upstream_api_key="k")
    (member,) = settings.members().members
    assert (member.name, member.kind, member.url) == ("openai", "openai", "http://h/v1")
    assert member.api_key == "k"
    assert member.serves_any
    assert member.cool_after_failures == 0
    assert Settings().members().members[0].name == "mock"


#: A mock member and an openai member, the start of most rows below.
MOCK = '[[upstream]]\nname = "m"\nkind = "mock"\n'
OPENAI = '[[upstream]]\nname = "o"\nkind = "openai"\n'
ERRORS: list[tuple[str, str, str]] = [
    ("unknown-table", "[keys]\nx = 1\n", "keys: unknown table (known: serve, upstream, group, key"),
    ("not-toml", "[[upstream]\n", "not valid TOML"),
    ("serve-unknown", "[serve]\nbogus = 1\n", "serve.bogus: unknown option"),
    (
        "serve-dashed",
        "[serve]\nfirst-token-timeout = 1\n",
        "serve.first-token-timeout: unknown option (did you mean first_token_timeout?)",
    ),
    ("serve-type", '[serve]\nport = "80"\n', "serve.port: must be an integer"),
    ("serve-bool", "[serve]\ncoalesce = 1\n", "serve.coalesce: must be true or false"),
    ("serve-float-bool", "[serve]\nrun_ttl = true\n", "serve.run_ttl: must be a number"),
    ("serve-keys", '[serve]\napi_keys = "k"\n', "serve.api_keys: must be a list of strings"),
    ("serve-config", '[serve]\nconfig = "other.toml"\n', "serve.config: unknown option"),
    ("serve-upstreams", '[serve]\nupstreams = "x"\n', "serve.upstreams: unknown option"),
    ("serve-not-table", "serve = 1\n", "serve: must be a table"),
    ("upstream-not-array", '[upstream]\nname = "a"\n', "upstream: must be [[upstream]] tables"),
    ("missing-name", '[[upstream]]\nkind = "mock"\n', "upstream[1].name: missing"),
    ("missing-kind", '[[upstream]]\nname = "m"\n', "upstream[1].kind: missing"),
    ("unknown-key", MOCK + "wieght = 2\n", "upstream[1].wieght: unknown key"),
    ("weight-type", MOCK + 'weight = "2"\n', "upstream[1].weight: must be a number"),
    ("weight-zero", MOCK + "weight = 0\n", "upstream[1].weight: must be > 0"),
    ("probe-type", MOCK + "probe = 1\n", "upstream[1].probe: must be true or false"),
    (
        "probe-interval",
        MOCK + "probe_interval_ms = 0\n",
        "upstream[1].probe_interval_ms: must be > 0",
    ),
    (
        "probe-never-cools",
        MOCK + "probe = true\ncool_after_failures = 0\n",
        "upstream[1].probe: a member that never cools down",
    ),
    ("weight-inf", MOCK + "weight = inf\n", "upstream[1].weight: must be > 0"),
    ("weight-nan", MOCK + "weight = nan\n", "upstream[1].weight: must be a number"),
    (
        "kind",
        '[[upstream]]\nname = "m"\nkind = "vllm"\n',
        "upstream[1].kind: must be one of openai, ollama, mock",
    ),
    ("url-missing", OPENAI, 'upstream[1].url: needed for kind = "openai"'),
    (
        "url-scheme",
        MOCK + OPENAI + 'url = "ftp://h"\n',
        "upstream[2].url: must start with http:// or https://",
    ),
    ("mock-url", MOCK + 'url = "http://h"\n', "upstream[1].url: a mock upstream has no url"),
    (
        "mock-delay-elsewhere",
        OPENAI + 'url = "http://h"\nmock_delay_ms = 1\n',
        "upstream[1].mock_delay_ms: only for kind",
    ),
    (
        "name-chars",
        '[[upstream]]\nname = "a b"\nkind = "mock"\n',
        "upstream[1].name: must be 1-64 letters",
    ),
    (
        "name-twice",
        MOCK + '[[upstream]]\nname = "m"\nkind = "mock"\n',
        "upstream[2].name: 'm' is already upstream[1]'s name",
    ),
    (
        "key-ollama",
        '[[upstream]]\nname = "o"\nkind = "ollama"\nurl = "http://h"\napi_key = "k"\n',
        "upstream[1].api_key: only an openai upstream is sent a key",
    ),
    (
        "key-both",
        OPENAI + 'url = "http://h"\napi_key = "k"\napi_key_env = "K"\n',
        "upstream[1].api_key_env: api_key and api_key_env exclude each other",
    ),
    (
        "key-env-unset",
        OPENAI + 'url = "http://h"\napi_key_env = "NOPE"\n',
        "upstream[1].api_key_env: the environment variable NOPE is unset",
    ),
    ("models-empty", MOCK + "models = []\n", "upstream[1].models: must name at least one model"),
    (
        "models-twice",
        MOCK + 'models = ["a", {name = "a", upstream = "b"}]\n',
        "upstream[1].models[2]: 'a' is listed twice",
    ),
    ("models-entry", MOCK + "models = [1]\n", "upstream[1].models[1]: must be a name or"),
    (
        "models-table-key",
        MOCK + 'models = [{name = "a", alias = "b"}]\n',
        "upstream[1].models[1].alias: unknown key",
    ),
    (
        "models-table-name",
        MOCK + 'models = [{upstream = "b"}]\n',
        "upstream[1].models[1].name: missing",
    ),
    (
        "models-any-renamed",
        MOCK + 'models = [{name = "*", upstream = "b"}]\n',
        'upstream[1].models[1]: "*" cannot be renamed',
    ),
    ("max-streams", MOCK + "max_streams = 0\n", "upstream[1].max_streams: must be >= 1"),
    ("timeout", MOCK + "token_timeout = 0\n", "upstream[1].token_timeout: must be > 0"),
    (
        "cool-after",
        MOCK + "cool_after_failures = -1\n",
        "upstream[1].cool_after_failures: must be >= 0",
    ),
    (
        "cooldown-order",
        MOCK + "cooldown_ms = 5000\nmax_cooldown_ms = 1000\n",
        "upstream[1].cooldown_ms: must be > 0 and <= max_cooldown_ms",
    ),
    (
        "group-unserved",
        MOCK + 'models = ["a"]\n[group.b]\nhedge_after_ms = 1\n',
        "group.b: no [[upstream]] serves the model 'b'",
    ),
    (
        "group-hedge",
        MOCK + "[group.a]\nhedge_after_ms = 0\n",
        "group.a.hedge_after_ms: must be > 0",
    ),
    (
        "group-key",
        MOCK + "[group.a]\nhedge = 1\n",
        "group.a.hedge: unknown key (known: hedge_after_ms)",
    ),
    ("group-alone", "[group.a]\nhedge_after_ms = 1\n", "group: needs [[upstream]] tables"),
    (
        "shorthand-too",
        '[serve]\nupstream_url = "http://h"\n[[upstream]]\nname = "m"\nkind = "mock"\n',
        "serve: upstream, upstream_url and upstream_api_key are the one-upstream shorthand",
    ),
]


@pytest.mark.parametrize(
    ("text", "fragment"), [row[1:] for row in ERRORS], ids=[row[0] for row in ERRORS]
)
def test_each_error_names_the_file_and_the_key(text: str, fragment: str) -> None:
    """Every problem of a file is a ConfigError naming the file and the key
    (``config.toml: upstream[2].url: ...``), 1-based like the tables."""
    assert f"config.toml: {fragment}" in problems(text)


def test_every_problem_is_reported_at_once() -> None:
    """Problems of different tables are all named in one ConfigError."""
    message = problems('[x]\n[serve]\nport = "p"\n[[upstream]]\nname = "m"\nkind = "mock"\nw = 1\n')
    for fragment in ("config.toml: x:", "config.toml: serve.port:", "config.toml: upstream[1].w:"):
        assert fragment in message
    assert message.count("; ") == 2


def test_unknown_tables_are_named_and_the_known_ones_are_four() -> None:
    """The loader's sections are exactly serve, upstream, group and key
    (whose tables trio_stream.limits.file reads); any other top-level name
    (a typo) is named as unknown."""
    assert SECTIONS == ("serve", "upstream", "group", "key")
    message = problems("[[key]]\nname = 'a'\n[upstreams]\n[keys]\n")
    assert "key: unknown table" not in message
    assert "upstreams: unknown table" in message
    assert "keys: unknown table" in message


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming it."""
    missing = tmp_path / "none.toml"
    with pytest.raises(ConfigError, match=r"none\.toml: cannot be read"):
        load(str(missing))


# -- [serve] takes every serve option ------------------------------------------

SAMPLES: dict[Any, tuple[str, Any]] = {
    str: ('"sample"', "sample"), int: ("7", 7), float: ("2.5", 2.5), bool: ("false", False),
}  # fmt: skip
CLI_FIELDS = [f for f in dataclasses.fields(Settings) if "cli" in f.metadata]


def test_serve_takes_every_option_but_config() -> None:
    """[serve]'s keys are exactly the serve options' settings, less ``config``."""
    assert set(serve_keys()) == {f.name for f in CLI_FIELDS} - {"config"}


@pytest.mark.parametrize(
    "field", [f for f in CLI_FIELDS if f.name != "config"], ids=lambda f: f.name
)
def test_each_serve_key_reaches_its_setting(field: dataclasses.Field[Any], tmp_path: Path) -> None:
    """A value in [serve] becomes the setting when neither the command line
    nor the environment gives the option (written once: the Settings field)."""
    hint = typing.get_type_hints(Settings)[field.name]
    base = next(t for t in (*typing.get_args(hint), hint) if t in SAMPLES or t is tuple)
    choices = field.metadata["cli"].choices
    expected: Any
    if typing.get_origin(hint) is tuple:
        raw, expected = '["sample"]', ("sample",)
    elif choices:
        raw, expected = f'"{choices[-1]}"', choices[-1]
    elif field.default is False:  # an option that is off by default (--otel)
        raw, expected = "true", True
    else:
        raw, expected = SAMPLES[base]
    path = tmp_path / "c.toml"
    path.write_text(f"[serve]\n{field.name} = {raw}\n")
    ctx = cli.serve.make_context("serve", ["--config", str(path)])
    assert ctx.params[field.name] == expected != field.default


def parse_cli(*args: str) -> Settings:
    ctx = cli.serve.make_context("serve", list(args))
    return cli.settings_from(ctx.params)


def test_command_line_beats_environment_beats_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Precedence: the command line, then TRIO_STREAM_*, then [serve], then
    the default; the file may itself be named by TRIO_STREAM_CONFIG."""
    path = tmp_path / "c.toml"
    path.write_text("[serve]\nport = 1111\nstall_timeout = 3\nrun_ttl = 4\n")
    monkeypatch.setenv("TRIO_STREAM_STALL_TIMEOUT", "5")
    s = parse_cli("--config", str(path), "--port", "2222")
    assert (s.port, s.stall_timeout, s.run_ttl, s.ping_interval) == (2222, 5.0, 4.0, 15.0)
    assert s.config == str(path)
    assert s.upstreams is None
    monkeypatch.setenv("TRIO_STREAM_CONFIG", str(path))
    assert parse_cli().run_ttl == 4.0


def test_members_come_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve --config`` puts the file's members in Settings.upstreams, and
    Settings.members() returns them."""
    monkeypatch.setenv("VLLM_KEY", "secret")
    path = tmp_path / "c.toml"
    path.write_text(EXAMPLE)
    s = parse_cli("--config", str(path))
    assert s.upstreams is not None
    assert s.members() is s.upstreams
    assert [m.name for m in s.members().members] == ["vllm-a", "local", "sim"]
    assert (s.port, s.api_keys, s.coalesce) == (9000, ("k1", "k2"), False)


def test_a_bad_file_is_a_usage_error(tmp_path: Path) -> None:
    """A bad file exits 2 before anything starts, naming the file and the key."""
    path = tmp_path / "bad.toml"
    path.write_text('[[upstream]]\nname = "o"\nkind = "openai"\nurl = "ftp://h"\n')
    with pytest.raises(click.BadParameter, match=r"bad\.toml: upstream\[1\]\.url: must start"):
        parse_cli("--config", str(path))


def test_the_shorthand_and_upstream_tables_exclude_each_other(tmp_path: Path) -> None:
    """--upstream-url (or --upstream, --upstream-api-key) with [[upstream]]
    tables is refused: which upstream would be meant is not clear."""
    path = tmp_path / "c.toml"
    path.write_text('[[upstream]]\nname = "m"\nkind = "mock"\n')
    with pytest.raises(ConfigError, match="one-upstream shorthand"):
        parse_cli("--config", str(path), "--upstream-url", "http://h/v1")


def test_settings_validate_members_given_by_an_embedder() -> None:
    """Settings(upstreams=...) is checked as a file is, keys named the same way."""
    bad = Upstreams((MemberSpec("a", "openai", "ftp://h"), MemberSpec("a", "mock")))
    with pytest.raises(ConfigError) as info:
        Settings(upstreams=bad).validate()
    assert "upstream[1].url: must start with http://" in str(info.value)
    assert "upstream[2].name: 'a' is already upstream[1]'s name" in str(info.value)
    Settings(upstreams=Upstreams((MemberSpec("a", "mock"),))).validate()


@pytest.mark.parametrize(("doc", "start"), [
    ("api.md", "[serve]                       # any serve option"),
    ("deploy.md", "# /etc/trio-stream/config.toml"),
])  # fmt: skip
def test_the_docs_example_files_are_valid(doc: str, start: str) -> None:
    """The example configuration files of docs/api.md section 1.3 and of
    docs/deploy.md (three replicas) are read without a problem: the docs
    show only keys and values the file takes."""
    text = (Path(__file__).resolve().parent.parent / "docs" / doc).read_text()
    begin = text.index(start)
    example = text[begin : text.index("```", begin)]
    config = parse(example, doc, {"VLLM_KEY": "k", "HOSTED_KEY": "k"})
    assert config.upstreams is not None
    assert len(config.upstreams.members) >= 2
