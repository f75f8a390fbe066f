"""Real reverse proxies (nginx, HAProxy) in front of a real trio-stream, for tests and tools.

Each proxy runs in the foreground (nginx ``daemon off``, HAProxy ``-db``) as
our own child, in a process group of its own, listening on a free port of
127.0.0.1, with everything it writes (pid, temp files, logs) under one
directory.  It is stopped by its pid: SIGTERM, then SIGKILL to its own
process group (nginx's workers) if it has not exited within
:data:`STOP_TIMEOUT`.

The binaries come from Debian's packages (``tools/install-services.sh``,
``make services``); a missing one is an error, never a skip.

Two kinds of configuration:

* **defaults**: the proxy's own defaults plus one ``proxy_pass`` /
  ``server`` line -- what someone gets who puts trio-stream behind a proxy
  without tuning it.  nginx then speaks HTTP/1.0 with ``Connection: close``
  to the upstream and buffers responses (trio-stream's
  ``X-Accel-Buffering: no`` turns that off per response).
* **production**: the files under ``docs/deploy/``, with their
  ``@PLACEHOLDER@`` values substituted (:func:`render`), TLS from a
  ``trustme`` test CA.

:func:`open_stack` puts it together: a :class:`~tools.fakes.FakeUpstream`,
a ``trio-stream serve`` subprocess using it as its OpenAI upstream, and a
proxy in front (or none: ``"direct"``).  :class:`Timeline` records when a
client saw each part of a stream.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import trio
import trustme

from tools.fakes import FakeUpstream, Plan
from tools.harness import RawClient, ServeProcess, serve_process
from trio_stream.wire.sse import SSEEvent

NGINX = Path("/usr/sbin/nginx")
HAPROXY = Path("/usr/sbin/haproxy")
PROXIES = ("nginx", "haproxy")
DEPLOY = Path(__file__).resolve().parent.parent / "docs" / "deploy"
NGINX_SITE = DEPLOY / "nginx.conf"
HAPROXY_CONFIG = DEPLOY / "haproxy.cfg"

START_TIMEOUT = 5.0  # seconds until the proxy accepts connections
STOP_TIMEOUT = 5.0  # seconds SIGTERM gets before SIGKILL
PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")

#: The test-only frame around an nginx site: where this instance writes.  It
#: sets no proxy behaviour (no buffering, timeout or protocol directive), so a
#: site inside it runs on nginx's defaults.  A root master would run its
#: workers as ``nobody``, who cannot enter pytest's private tmp directories.
NGINX_MAIN = """\
{user}pid {dir}/nginx.pid;
error_log stderr info;
events {{}}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {site};
}}
"""


# -- starting and stopping a proxy ------------------------------------------


@dataclass(frozen=True)
class Proxy:
    """A running proxy: our child process, listening on 127.0.0.1:``port``."""

    name: str
    port: int
    process: trio.Process
    log: Path  # its stdout and stderr


def require(binary: Path) -> Path:
    """``binary`` if it is installed; otherwise fail loudly, saying how to fix it."""
    if not os.access(binary, os.X_OK):
        raise RuntimeError(
            f"{binary} is missing: run `make services` (tools/install-services.sh) "
            "to install nginx-light and haproxy"
        )
    return binary


def free_port() -> int:
    """A port of 127.0.0.1 that is free now (the proxy binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def nginx_command(directory: Path, site: str) -> list[str]:
    """Write nginx's files under ``directory``; the command that runs it in the foreground."""
    binary = require(NGINX)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "site.conf").write_text(site)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_MAIN.format(user=user, dir=directory, site=directory / "site.conf"))
    return [str(binary), "-p", f"{directory}/", "-c", str(conf), "-e", "stderr",
            "-g", "daemon off;"]  # fmt: skip


def haproxy_command(directory: Path, config: str) -> list[str]:
    """Write HAProxy's config under ``directory``; the command that runs it in the foreground."""
    binary = require(HAPROXY)
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "haproxy.cfg"
    conf.write_text(config)
    return [str(binary), "-db", "-f", str(conf)]


@asynccontextmanager
async def nginx(directory: Path, site: str, port: int) -> AsyncIterator[Proxy]:
    """Run nginx with ``site`` (the inside of an ``http`` block) until the block exits."""
    argv = nginx_command(directory, site)
    async with _running("nginx", argv, port, directory / "nginx.log") as proxy:
        yield proxy


@asynccontextmanager
async def haproxy(directory: Path, config: str, port: int) -> AsyncIterator[Proxy]:
    """Run HAProxy with ``config`` (a whole ``haproxy.cfg``) until the block exits."""
    argv = haproxy_command(directory, config)
    async with _running("haproxy", argv, port, directory / "haproxy.log") as proxy:
        yield proxy


@asynccontextmanager
async def _running(name: str, argv: list[str], port: int, log: Path) -> AsyncIterator[Proxy]:
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    try:
        await _wait_listening(name, process, port, log)
        yield Proxy(name, port, process, log)
    finally:
        with trio.CancelScope(shield=True):
            await _stop(process)


async def _wait_listening(name: str, process: trio.Process, port: int, log: Path) -> None:
    """Return once 127.0.0.1:``port`` accepts; fail if the proxy exits first."""
    with trio.fail_after(START_TIMEOUT):
        while True:
            if process.returncode is not None:
                raise _exited(name, process, port, log)
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.01)
                continue
            await stream.aclose()
            return


def _exited(name: str, process: trio.Process, port: int, log: Path) -> RuntimeError:
    return RuntimeError(
        f"{name} exited with {process.returncode} before listening on 127.0.0.1:{port}; "
        f"its log:\n{log.read_text()}"
    )


async def _stop(process: trio.Process) -> None:
    """SIGTERM (both proxies' fast stop); then SIGKILL to the process group it leads."""
    if process.returncode is None:
        process.terminate()
        with trio.move_on_after(STOP_TIMEOUT):
            await process.wait()
    if process.returncode is None:
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


# -- configurations ----------------------------------------------------------


def nginx_default_site(port: int, upstream_port: int) -> str:
    """nginx's defaults plus ``proxy_pass``: HTTP/1.0, ``Connection: close``, buffering on."""
    return f"""\
server {{
    listen 127.0.0.1:{port};
    location / {{
        proxy_pass http://127.0.0.1:{upstream_port};
    }}
}}
"""


def haproxy_default_config(port: int, upstream_port: int) -> str:
    """The least HAProxy starts with: HTTP mode and the three timeouts, one server."""
    return f"""\
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend edge
    bind 127.0.0.1:{port}
    default_backend trio_stream

backend trio_stream
    server trio_stream 127.0.0.1:{upstream_port}
"""


def render(template: Path, values: Mapping[str, object]) -> str:
    """``template``'s text with each ``@NAME@`` replaced by ``values[NAME]``.

    Every placeholder must get a value and every value must be used, so a
    config and its test cannot drift apart silently.
    """
    text = template.read_text()
    unused = [name for name in values if f"@{name}@" not in text]
    text = PLACEHOLDER.sub(lambda m: str(values.get(m[1], m[0])), text)
    left = PLACEHOLDER.findall(text)
    if unused or left:
        raise ValueError(f"{template}: unused values {unused}, placeholders left {left}")
    return text


@dataclass(frozen=True)
class TLSFiles:
    """A server certificate for 127.0.0.1 from a ``trustme`` test CA, as files."""

    ca: Any  # trustme.CA
    chain: Path  # certificate chain (nginx ``ssl_certificate``)
    key: Path  # private key (nginx ``ssl_certificate_key``)
    combined: Path  # key and chain in one file (HAProxy ``crt``)

    @classmethod
    def issue(cls, directory: Path) -> TLSFiles:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        files = cls(ca, directory / "chain.pem", directory / "key.pem", directory / "both.pem")
        files.chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(files.key))
        cert.private_key_and_cert_chain_pem.write_to_path(str(files.combined))
        return files

    def client_context(self, *alpn: str) -> ssl.SSLContext:
        """A client context trusting the test CA, offering ``alpn`` if given."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if alpn:
            context.set_alpn_protocols(list(alpn))
        return context


def production_config(kind: str, port: int, upstream_port: int, tls: TLSFiles) -> str:
    """``docs/deploy/``'s config for ``kind``, listening on 127.0.0.1:``port``."""
    listen, upstream = f"127.0.0.1:{port}", f"127.0.0.1:{upstream_port}"
    if kind == "nginx":
        values = {"LISTEN": listen, "CERT": tls.chain, "KEY": tls.key, "TRIO_STREAM": upstream}
        return render(NGINX_SITE, values)
    return render(HAPROXY_CONFIG, {"LISTEN": listen, "CERT_PEM": tls.combined,
                                   "TRIO_STREAM": upstream})  # fmt: skip


def default_config(kind: str, port: int, upstream_port: int) -> str:
    """The proxy's defaults plus the one line that points it at trio-stream."""
    if kind == "nginx":
        return nginx_default_site(port, upstream_port)
    return haproxy_default_config(port, upstream_port)


# -- the whole stack: fake upstream, trio-stream, proxy ----------------------


@dataclass(frozen=True)
class Stack:
    """A fake upstream, the trio-stream subprocess using it, and a proxy in front."""

    fake: FakeUpstream
    server: ServeProcess
    proxy: Proxy | None  # None: clients talk to trio-stream directly

    @property
    def kind(self) -> str:
        """``nginx``, ``haproxy`` or ``direct``."""
        return self.proxy.name if self.proxy is not None else "direct"

    @property
    def port(self) -> int:
        """Where clients connect."""
        return self.proxy.port if self.proxy is not None else self.server.port


@asynccontextmanager
async def open_stack(
    directory: Path, kind: str, plan: Callable[[dict[str, Any]], Plan], *serve_args: str,
    tls: TLSFiles | None = None,
) -> AsyncIterator[Stack]:  # fmt: skip
    """Run the whole stack for the block.  ``kind``: ``nginx``, ``haproxy`` or
    ``direct``; with ``tls`` the proxy runs its production config, else its
    defaults.  ``serve_args`` are extra ``trio-stream serve`` options."""
    await trio.Path(directory).mkdir(parents=True, exist_ok=True)
    fake = FakeUpstream("openai", plan=plan)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        args = ("--port", "0", "--db", str(directory / "trio-stream.db"), "--upstream",
                "openai", "--upstream-url", fake.url, "--log-format", "json")  # fmt: skip
        async with serve_process(*args, *serve_args) as server:
            if kind == "direct":
                yield Stack(fake, server, None)
            else:
                async with _proxy(directory / kind, kind, server.port, tls) as proxy:
                    yield Stack(fake, server, proxy)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _proxy(
    directory: Path, kind: str, upstream_port: int, tls: TLSFiles | None
) -> AsyncIterator[Proxy]:
    if kind not in PROXIES:
        raise ValueError(f"unknown proxy {kind!r}: one of {PROXIES} (or 'direct')")
    port = free_port()
    if tls is None:
        config = default_config(kind, port, upstream_port)
    else:
        config = production_config(kind, port, upstream_port, tls)
    start = nginx if kind == "nginx" else haproxy
    async with start(directory, config, port) as proxy:
        yield proxy


# -- what a client saw, and when ---------------------------------------------


def chat(content: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    """A streaming chat request; ``content`` names it in the fake upstream's records."""
    messages = [{"role": "user", "content": content}]
    return {"model": "m", "messages": messages, "stream": True, "max_tokens": max_tokens,
            **extra}  # fmt: skip


def delta_text(event: SSEEvent) -> str | None:
    """The content of a delta event; ``None`` for anything else (finish chunk, [DONE], error)."""
    if not event.data.startswith("{"):
        return None
    choices = orjson.loads(event.data).get("choices") or [{}]
    if choices[0].get("finish_reason") is not None:
        return None
    content = choices[0].get("delta", {}).get("content")
    return content if isinstance(content, str) else None


@dataclass
class Timeline:
    """The ``trio.current_time()`` of each event a client received, and of the response's end."""

    sent: float
    events: list[tuple[float, SSEEvent]] = field(default_factory=list)
    end: float | None = None  # the chunked terminator, END_STREAM, or EOF
    _changed: trio.Event = field(default_factory=trio.Event, init=False, repr=False)

    def add(self, events: list[SSEEvent]) -> None:
        now = trio.current_time()
        self.events.extend((now, e) for e in events)
        self._changed.set()
        self._changed = trio.Event()

    def finish(self) -> None:
        self.end = trio.current_time()
        self._changed.set()

    async def wait_deltas(self, n: int) -> None:
        """Block until ``n`` delta events have arrived (fails if the response ends first)."""
        while len(self.delta_times) < n:
            if self.end is not None:
                raise AssertionError(f"the response ended after {self.events}")
            await self._changed.wait()

    @property
    def delta_times(self) -> list[float]:
        return [t for t, e in self.events if delta_text(e) is not None]

    @property
    def first_delta(self) -> float:
        return self.delta_times[0]

    @property
    def last_delta_id(self) -> str:
        """The ``id:`` of the last delta: where a resume continues from."""
        event_id = [e for _, e in self.events if delta_text(e) is not None][-1].id
        assert event_id is not None
        return event_id

    @property
    def done(self) -> float:
        """When ``data: [DONE]`` arrived."""
        return next(t for t, e in self.events if e.data == "[DONE]")

    @property
    def text(self) -> str:
        return "".join(delta_text(e) or "" for _, e in self.events)

    @property
    def last(self) -> SSEEvent:
        return self.events[-1][1]


async def read_raw(client: RawClient, timeline: Timeline) -> None:
    """Read ``client``'s response to its end into ``timeline``."""
    while (event := await client.next_event()) is not None:
        timeline.add([event])
    timeline.finish()


async def upstream_finished(fake: FakeUpstream, content: str) -> float:
    """When ``fake`` finished sending its response to the request naming ``content``.

    The fake upstream sends the finish chunk and its ``[DONE]`` right after the
    last token, with no delay, so this is when the last token left it.
    Start it before that response ends.
    """

    def finished() -> bool:
        conn = next((c for c in fake.connections if content in _contents(c.requests)), None)
        return conn is not None and (not conn.busy or conn.closed is not None)

    await fake.wait_for(finished)
    return trio.current_time()


def upstream_closed(fake: FakeUpstream, content: str) -> float | None:
    """When the upstream connection that carried ``content``'s request closed (or None)."""
    for conn in fake.connections:
        if content in _contents(conn.requests):
            return conn.closed
    return None


def _contents(requests: list[dict[str, Any]]) -> list[str]:
    return [r["messages"][0]["content"] for r in requests if r.get("messages")]


async def timed_stream(stack: Stack, content: str, max_tokens: int) -> tuple[Timeline, float]:
    """One streamed request over plain HTTP/1.1 (raw socket) through ``stack``.

    Returns what the client saw, and when the upstream's last token left it.
    """
    async with trio.open_nursery() as nursery:
        finished: list[float] = []

        async def stamp() -> None:
            finished.append(await upstream_finished(stack.fake, content))

        nursery.start_soon(stamp)
        timeline = Timeline(sent=trio.current_time())
        client = await RawClient.post(stack.port, "/v1/chat/completions", chat(content, max_tokens))
        try:
            await read_raw(client, timeline)
        finally:
            await client.aclose()
    return timeline, finished[0]


async def upstream_request(fake: FakeUpstream, content: str) -> None:
    """Block until the request naming ``content`` has reached ``fake``."""
    await fake.wait_for(lambda: content in _contents(fake.requests))


async def wait_upstream_closed(fake: FakeUpstream, content: str) -> float:
    """Block until the upstream connection of ``content``'s request closes; when it did."""
    await fake.wait_for(lambda: upstream_closed(fake, content) is not None)
    closed = upstream_closed(fake, content)
    assert closed is not None
    return closed


async def leave_mid_stream(stack: Stack, content: str, max_tokens: int) -> float:
    """Stream over plain HTTP/1.1, close the socket after the first event;
    seconds from that close to the upstream connection's close."""
    client = await RawClient.post(stack.port, "/v1/chat/completions", chat(content, max_tokens))
    try:
        if await client.next_event() is None:
            raise AssertionError(f"the stream ended at once: {bytes(client.body)!r}")
    finally:
        left_at = trio.current_time()
        await client.aclose()
    return await wait_upstream_closed(stack.fake, content) - left_at
