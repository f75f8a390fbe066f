"""The browser playground (``GET /``, docs/api.md section 9) in a real Chromium.

Each test serves trio-stream in process over TLS (a ``trustme`` certificate,
so Chromium speaks h2 by ALPN) with an ``openai`` upstream that is a
:class:`~tools.fakes.FakeUpstream`, whose connection log shows when the
upstream request really closed.  One headless Chromium (Debian's
``chromium`` + ``chromium-driver``, ``make services``) serves the module; it
trusts exactly the test certificate's key (``--ignore-certificate-errors-spki-list``).
Every test gets its own server, hence its own origin and its own
``sessionStorage``.

Selenium blocks, so every browser call runs in a worker thread
(:class:`Page`) while the server and the fake upstream run on the test's trio
loop.  Screenshots of each state land in ``test-artifacts/playground/``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from selenium import webdriver
from selenium.webdriver.chrome.options import Options as ChromeOptions
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By

from tests.conftest import Server, running_server
from tools.fakes import FakeUpstream, Plan, Step, mock_plan, openai_chunk, token_plan
from trio_stream import Settings
from trio_stream.config.members import MemberSpec, ModelName, Upstreams
from trio_stream.upstream import mocktext

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "playground"
KEY = "k-playground"
T = TypeVar("T")


# -- TLS, Chromium, and a page driven from trio ---------------------------------


@dataclass(frozen=True)
class TLS:
    ca: trustme.CA
    certfile: Path
    keyfile: Path
    spki: str  # base64 SHA-256 of the certificate's public key, as Chromium's flag wants it

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLS:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    folder = tmp_path_factory.mktemp("tls")
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    certfile.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(keyfile))
    leaf = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    der = leaf.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return TLS(ca, certfile, keyfile, base64.b64encode(hashlib.sha256(der).digest()).decode())


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory, tls: TLS) -> Iterator[webdriver.Chrome]:
    """One headless Chromium for the module, trusting only the test certificate."""
    binary, driver_binary = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_binary is None:
        pytest.fail("chromium and chromium-driver are not installed: run make services")
    options = ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,900", "--hide-scrollbars",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        f"--ignore-certificate-errors-spki-list={tls.spki}",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=ChromeService(driver_binary))
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()  # ends chromedriver and the browser it started


class Page:
    """The playground in the module's Chromium; every call runs in a worker thread."""

    def __init__(self, driver: webdriver.Chrome, url: str, name: str) -> None:
        self.driver, self.url, self.name = driver, url, name

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(partial(fn, *args), abandon_on_cancel=True)

    async def open(self) -> None:
        await self.call(self.driver.get, self.url)
        await self.wait("return document.querySelector('.pane') !== null")

    async def reload(self) -> None:
        await self.call(self.driver.refresh)
        await self.wait("return document.querySelector('.pane') !== null")

    async def js(self, script: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, script, *args)

    async def click(self, css: str) -> None:
        await self.call(lambda: self.driver.find_element(By.CSS_SELECTOR, css).click())

    async def type(self, css: str, text: str) -> None:
        def type_() -> None:
            element = self.driver.find_element(By.CSS_SELECTOR, css)
            element.clear()
            element.send_keys(text)

        await self.call(type_)

    async def text(self, css: str) -> str:
        return str(await self.js("return document.querySelector(arguments[0]).textContent", css))

    async def wait(self, script: str, *args: Any, limit: float = 10) -> Any:
        """Poll ``script`` (a function body) until it returns something truthy
        (the page has no way to signal the test: polling is the only way)."""
        with trio.fail_after(limit):
            while not (value := await self.js(script, *args)):  # noqa: ASYNC110
                await trio.sleep(0.02)
        return value

    async def wait_status(self, status: str) -> None:
        script = "return document.querySelector('#status').textContent === arguments[0]"
        await self.wait(script, status)

    async def screenshot(self, state: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{state}.png"
        assert await self.call(self.driver.save_screenshot, str(path))

    async def login_and_send(self, prompt: str) -> None:
        await self.type("#api-key", KEY)
        await self.type("#prompt", prompt)
        await self.click("#send")


@asynccontextmanager
async def playground(
    settings: Settings, tls: TLS, driver: webdriver.Chrome, plan: Callable[[dict[str, Any]], Plan],
    name: str,
) -> AsyncIterator[tuple[Page, Server, FakeUpstream, httpx.AsyncClient]]:  # fmt: skip
    """A TLS server with an API key in front of a fake upstream, and the page open on it."""
    async with trio.open_nursery() as nursery:
        fake = FakeUpstream("openai", plan)
        await nursery.start(fake.serve)
        s = settings.replace(
            upstream="openai", upstream_url=fake.url, api_keys=(KEY,),
            certfile=str(tls.certfile), keyfile=str(tls.keyfile),
        )  # fmt: skip
        async with (
            running_server(s) as server,
            httpx.AsyncClient(
                base_url=f"https://127.0.0.1:{server.port}", verify=tls.client_context(),
                headers={"authorization": f"Bearer {KEY}"}, timeout=10,
            ) as api,
        ):  # fmt: skip
            page = Page(driver, f"https://127.0.0.1:{server.port}/", name)
            await page.open()
            yield page, server, fake, api
        nursery.cancel_scope.cancel()


def words(n: int, start: int = 0) -> list[str]:
    return [("" if i == 0 else " ") + mocktext.word(start + i) for i in range(n)]


def record_figure(name: str, value: float) -> None:
    """Keep a measured figure next to the screenshots (figures.json)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "figures.json"
    figures = json.loads(path.read_text()) if path.exists() else {}
    figures[name] = round(value, 4)
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")


def chats(fake: FakeUpstream) -> list[dict[str, Any]]:
    """The chat completion requests the upstream got (the page also lists models)."""
    return [r for r in fake.requests if "messages" in r]


def user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


# -- the tests ------------------------------------------------------------------


async def test_page_and_static_files_are_public_with_a_strict_policy(
    settings: Settings, tls: TLS, chromium: webdriver.Chrome
) -> None:
    """``/`` and every playground file answer without a key (the API still
    needs one), each with a CSP that allows only the page's own files (no
    inline script, no other origin) and ``nosniff``, with the right types;
    an unknown playground file is a 404 like any unknown path."""
    async with playground(settings, tls, chromium, mock_plan("openai"), "headers") as (
        _, _, _, api,
    ):  # fmt: skip
        bare = {"authorization": ""}
        for path, kind in [
            ("/", "text/html"), ("/playground/app.js", "text/javascript"),
            ("/playground/sse.js", "text/javascript"), ("/playground/style.css", "text/css"),
            ("/playground/favicon.svg", "image/svg+xml"),
        ]:  # fmt: skip
            r = await api.get(path, headers=bare)
            assert r.status_code == 200, path
            assert r.headers["content-type"].startswith(kind), path
            assert r.headers["x-content-type-options"] == "nosniff"
            csp = r.headers["content-security-policy"]
            assert "default-src 'self'" in csp
            assert "script-src 'self';" in csp
            assert "unsafe-inline" not in csp
            assert "unsafe-eval" not in csp
        assert (await api.get("/v1/models", headers=bare)).status_code == 401
        missing = await api.get("/playground/../app.py", headers=bare)
        assert missing.status_code == 404
        assert (await api.get("/playground/nope.js")).json()["error"]["code"] == "unknown_url"


async def test_send_renders_the_exact_reply_over_h2(
    settings: Settings, tls: TLS, chromium: webdriver.Chrome
) -> None:
    """Send streams the answer into ``#output`` as it arrives; the text equals
    the upstream's reply exactly, ``#status`` ends ``done``, the key went as
    ``Bearer``, and every request the page made (the page, its files, the
    stream, /metrics) went over h2."""
    prompt = "hello over h2"
    async with playground(settings, tls, chromium, mock_plan("openai", 0.01), "send") as (
        page, _, fake, _,
    ):  # fmt: skip
        await page.screenshot("idle")
        await page.login_and_send(prompt)
        await page.wait("return document.querySelector('#output').textContent.length > 0")
        await page.screenshot("streaming")
        await page.wait_status("done")
        await page.screenshot("done")
        assert await page.text("#output") == mocktext.expected_text(user(prompt))
        assert chats(fake)[0]["messages"] == user(prompt)
        await page.wait(r"return /^\d+$/.test(document.querySelector('#metric-tasks').textContent)")
        protocols = await page.js(
            "return performance.getEntriesByType('navigation').concat("
            "performance.getEntriesByType('resource')).map(e => [e.name, e.nextHopProtocol])"
        )
        names = [name for name, _ in protocols]
        assert any(n.endswith("/v1/chat/completions") for n in names), names
        assert any(n.endswith("/metrics") for n in names), names
        assert {protocol for _, protocol in protocols} == {"h2"}, protocols


async def test_stop_closes_the_upstream_within_a_second_and_saves_once(
    settings: Settings, tls: TLS, chromium: webdriver.Chrome
) -> None:
    """Stop mid-answer cancels the run through the cancel endpoint: the
    upstream connection closes within 1 s of the click, ``#status`` reads
    ``stopped``, and the partial answer is saved exactly once (reason
    ``stopped``), holding at least what the page showed."""
    plan = lambda _: token_plan(words(200), delay=0.05)  # noqa: E731
    async with playground(settings, tls, chromium, plan, "stop") as (page, _, fake, api):
        await page.login_and_send("stop me")
        await page.wait(
            "return document.querySelector('#output').textContent.split(' ').length >= 4"
        )
        (upstream,) = [c for c in fake.connections if any("messages" in r for r in c.requests)]
        assert upstream.closed is None
        clicked = trio.current_time()
        await page.click("#stop")
        with trio.fail_after(5):
            await fake.wait_for(lambda: upstream.closed is not None)
        assert upstream.closed is not None
        record_figure("stop_click_to_upstream_close_s", upstream.closed - clicked)
        assert upstream.closed - clicked < 1.0
        await page.wait_status("stopped")
        await page.screenshot("stopped")
        shown = await page.text("#output")
        session = await page.js("return document.querySelector('.pane').dataset.sessionId")
        messages = f"/v1/sessions/{session}/messages"
        with trio.fail_after(5):  # the save ends the run's cleanup; only HTTP shows it
            while not (await api.get(messages)).json()["data"]:  # noqa: ASYNC110
                await trio.sleep(0.05)
        await trio.sleep(0.3)  # a second save would have landed by now
        saved = (await api.get(messages)).json()["data"]
        assert [(m["status"], m["reason"]) for m in saved] == [("partial", "stopped")]
        assert shown
        assert saved[0]["content"].startswith(shown)
        assert "".join(words(200)).startswith(saved[0]["content"])


async def test_stop_before_the_first_token_interrupts_the_session(
    settings: Settings, tls: TLS, chromium: webdriver.Chrome
) -> None:
    """Stop before the first token (no run id yet: headers come with the first
    event) interrupts the pane's session instead: the upstream request closes
    within 1 s of the click and the pane ends ``stopped`` with no text."""
    plan = lambda _: Plan(steps=[Step(openai_chunk("late"), delay=30)])  # noqa: E731
    async with playground(settings, tls, chromium, plan, "stop-early") as (page, _, fake, _):
        await page.login_and_send("never answered")
        with trio.fail_after(5):
            await fake.wait_for(lambda: fake.busy_connections == 1)
        (upstream,) = [c for c in fake.connections if c.busy]
        clicked = trio.current_time()
        await page.click("#stop")
        with trio.fail_after(5):
            await fake.wait_for(lambda: upstream.closed is not None)
        assert upstream.closed is not None
        record_figure("stop_before_first_token_to_upstream_close_s", upstream.closed - clicked)
        assert upstream.closed - clicked < 1.0
        await page.wait_status("stopped")
        await page.screenshot("stopped")
        assert await page.text("#output") == ""


async def test_a_second_send_supersedes_the_first(
    settings: Settings, tls: TLS, chromium: webdriver.Chrome
) -> None:
    """A second Send mid-answer reuses the pane's session, so the server
    supersedes the first run (saved once as ``partial``/``superseded``); the
    pane then shows exactly the second answer, nothing of the first."""
    replies = [words(200, start=0x100), words(16, start=0x200)]
    answers = iter(replies)  # the upstream's plan is made once per chat request
    plan = lambda _: token_plan(next(answers), delay=0.03)  # noqa: E731
    async with playground(settings, tls, chromium, plan, "supersede") as (page, _, fake, api):
        await page.login_and_send("first")
        await page.wait(
            "return document.querySelector('#output').textContent.split(' ').length >= 4"
        )
        await page.type("#prompt", "second")
        await page.click("#send")
        await page.wait_status("done")
        await page.screenshot("done")
        assert await page.text("#output") == "".join(replies[1])
        assert [c["messages"] for c in chats(fake)] == [user("first"), user("second")]
        session = await page.js("return document.querySelector('.pane').dataset.sessionId")
        saved = (await api.get(f"/v1/sessions/{session}/messages")).json()["data"]
        assert [(m["status"], m["reason"]) for m in saved] == [
            ("partial", "superseded"), ("complete", "stop"),
        ]  # fmt: skip


async def test_eight_panes_stream_in_parallel_and_end_exact(
    settings: Settings, tls: TLS, chromium: webdriver.Chrome
) -> None:
    """With 8 panes, one Send starts 8 runs, each in its own session: all 8
    show their first token before any of them finishes (tokens 50 ms apart),
    and each ends ``done`` with the exact reply."""
    tokens = words(12, start=0x400)
    plan = lambda _: token_plan(tokens, delay=0.05)  # noqa: E731
    async with playground(settings, tls, chromium, plan, "panes") as (page, _, fake, api):
        await page.js(
            "const n = document.querySelector('#panes'); n.value = '8';"
            "n.dispatchEvent(new Event('change'));"
        )
        # Record, in the page, when each pane first shows text and when it is done.
        await page.js("""
            window.__seen = {first: [], done: []};
            document.querySelectorAll('.pane').forEach((pane, i) => {
              new MutationObserver(() => {
                const now = performance.now();
                if (pane.querySelector('.output').textContent && !window.__seen.first[i])
                  window.__seen.first[i] = now;
                if (pane.querySelector('.status').textContent === 'done' && !window.__seen.done[i])
                  window.__seen.done[i] = now;
              }).observe(pane, {subtree: true, childList: true, characterData: true});
            });
        """)
        await page.login_and_send("eight at once")
        await page.wait("return document.querySelectorAll('.pane .output:not(:empty)').length >= 8")
        await page.screenshot("streaming")
        await page.wait_status("done")
        await page.screenshot("done")
        seen = await page.js("return window.__seen")
        assert len(seen["first"]) == len(seen["done"]) == 8
        assert max(seen["first"]) < min(seen["done"]), seen
        panes = await page.js(
            "return [...document.querySelectorAll('.pane')].map(p => [p.dataset.sessionId,"
            " p.dataset.runId, p.querySelector('.output').textContent,"
            " p.querySelector('.status').textContent])"
        )
        assert [(text, status) for _, _, text, status in panes] == [("".join(tokens), "done")] * 8
        assert len({session for session, *_ in panes}) == 8
        assert len({run for _, run, *_ in panes}) == 8
        assert len(chats(fake)) == 8
        for session, run, _, _ in panes:
            (saved,) = (await api.get(f"/v1/sessions/{session}/messages")).json()["data"]
            assert (saved["run_id"], saved["status"]) == (run, "complete")


async def test_detached_answer_survives_a_reload_exactly(
    settings: Settings, tls: TLS, chromium: webdriver.Chrome
) -> None:
    """With Detach ticked, reloading the page mid-answer resumes the same run
    from the last event id the page stored (``/v1/runs/{id}/events``): the
    page finishes the answer with no token lost or repeated, and the upstream
    was asked once."""
    tokens = words(40, start=0x900)
    plan = lambda _: token_plan(tokens, delay=0.05)  # noqa: E731
    async with playground(settings, tls, chromium, plan, "detach") as (page, _, fake, _):
        await page.click("#detach")
        await page.login_and_send("survive a reload")
        await page.wait(
            "return document.querySelector('#output').textContent.split(' ').length >= 8"
        )
        await page.screenshot("before-reload")
        assert fake.busy_connections == 1  # mid-answer
        await page.reload()
        resumed = await page.js(
            "return performance.getEntriesByType('resource').some(e => e.name.includes('/events'))"
        )
        assert await page.text("#status") == "streaming"
        await page.screenshot("after-reload")
        await page.wait_status("done")
        await page.screenshot("done")
        assert await page.text("#output") == "".join(tokens)
        assert resumed or await page.js(
            "return performance.getEntriesByType('resource').some(e => e.name.includes('/events'))"
        )
        assert len(chats(fake)) == 1


async def test_markup_in_an_answer_is_shown_as_text_and_never_runs(
    settings: Settings, tls: TLS, chromium: webdriver.Chrome
) -> None:
    """Model output is text, never markup: an answer holding ``<img onerror>``
    and ``<script>`` shows those characters verbatim, creates no element, and
    no script of it runs."""
    tokens = [
        "Look: ", '<img src=x onerror="window.__pwned=1">', " and ",
        "<script>window.__pwned=2</script>", " <b>bold?</b>",
    ]  # fmt: skip
    plan = lambda _: token_plan(tokens, delay=0.02)  # noqa: E731
    async with playground(settings, tls, chromium, plan, "markup") as (page, _, _, _):
        await page.login_and_send("say something nasty")
        await page.wait_status("done")
        await trio.sleep(0.2)  # an image error handler would have fired by now
        await page.screenshot("done")
        assert await page.text("#output") == "".join(tokens)
        assert await page.js("return typeof window.__pwned") == "undefined"
        assert await page.js("return document.querySelectorAll('.pane img, .pane script, .pane b')"
                             ".length") == 0  # fmt: skip


async def test_the_model_picker_lists_v1_models_and_the_pane_names_the_member(
    settings: Settings, tls: TLS, chromium: webdriver.Chrome
) -> None:
    """With two upstream members (docs/api.md section 1.3), ``alpha`` on one
    and ``beta`` (known upstream as ``vendor/beta``) on the other, the model
    picker (``#model``'s ``#models`` list) offers exactly GET /v1/models'
    names once the key is typed; picking ``beta`` sends the run to beta's
    member only, under its own name, the answer is exact, and the pane names
    the member that served it (``data-served-by``, its note)."""
    async with trio.open_nursery() as nursery:
        fakes = [FakeUpstream("openai", mock_plan("openai", 0.01)) for _ in range(2)]
        for fake in fakes:
            await nursery.start(fake.serve)
        alpha, beta = fakes
        members = Upstreams((
            MemberSpec("alpha-box", "openai", alpha.url, models=(ModelName("alpha", "alpha"),)),
            MemberSpec("beta-box", "openai", beta.url,
                       models=(ModelName("beta", "vendor/beta"),)),
        ))  # fmt: skip
        s = settings.replace(upstreams=members, api_keys=(KEY,), certfile=str(tls.certfile),
                             keyfile=str(tls.keyfile))  # fmt: skip
        async with running_server(s) as server:
            page = Page(chromium, f"https://127.0.0.1:{server.port}/", "models")
            await page.open()
            options = "return [...document.querySelectorAll('#models option')].map(o => o.value)"
            assert await page.js(options) == []  # no key yet: /v1/models answered 401
            await page.type("#api-key", KEY)
            await page.type("#model", "beta")  # the key field's change event loads the list
            await page.wait("return document.querySelectorAll('#models option').length === 2")
            assert await page.js(options) == ["alpha", "beta"]
            prompt = "which member?"
            await page.type("#prompt", prompt)
            await page.click("#send")
            await page.wait_status("done")
            assert await page.text("#output") == mocktext.expected_text(user(prompt))
            assert [c["model"] for c in chats(beta)] == ["vendor/beta"]
            assert chats(alpha) == []
            served = "return document.querySelector('.pane').dataset.servedBy"
            assert await page.wait(served) == "beta-box"
            assert (await page.text(".pane .note")).endswith("served by beta-box")
            await page.screenshot("served-by")
        nursery.cancel_scope.cancel()
