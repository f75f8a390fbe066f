"""The canary of the hypercorn fork (``trio_stream/server/``, docs/design.md section 2).

trio-stream copies or overrides a handful of hypercorn 0.18.0's functions
(listed in the ``trio_stream.server`` docstring), and one private method of
h11 0.16.0.  A copy is only right
against the code it was copied from, so each of them is pinned here by the
SHA-256 of its source: any change in a new hypercorn release -- a line, a
signature, a renamed lock -- fails this test, and the failure names the
function to re-read against its copy.  A second test checks the assumption
of the direct HTTP/1.1 body path: that our chunk framing is byte for byte
h11's, and that h11 keeps no count of chunked bytes it did not write.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from importlib import metadata
from typing import Any, cast

import h11
import trio

from trio_stream.http.transport import DirectBody, Link
from trio_stream.server import hypercorn_fixes

#: What the fork copies or overrides, by where it lives in hypercorn 0.18.0,
#: and the SHA-256 of that function's source there.
PINNED = {
    # LightTCPServer.run is a copy (server/connection.py)
    "hypercorn.trio.tcp_server.TCPServer.run":
        "fd34b021d1a86c9859514de9472306ea47f4a6763732b26b7a5945278ded0e08",
    # Connection._close calls it inside a shield with a deadline (server/serve.py)
    "hypercorn.trio.tcp_server.TCPServer._close":
        "bc73c4ae25a1ceec1d535639443b57b3d3dea8b03c5375d58bf9702b8056ee15",
    # DirectBody writes under this method's send_lock (http/transport.py)
    "hypercorn.trio.tcp_server.TCPServer.protocol_send":
        "225856426bff7be02990c0badb90f51f801db14ac5db0f3d0c210cafbeb528ab",
    # LightTCPServer._initiate_server_close says GOAWAY first, then calls it
    "hypercorn.trio.tcp_server.TCPServer._initiate_server_close":
        "7c1b548a65adc8b1b1358fdacbc860be3070fe99d5b1bdcfcde4c5c73a9cce03",
    # ... which this creates (and LightTCPServer.run reads its attributes)
    "hypercorn.trio.tcp_server.TCPServer.__init__":
        "4c1d42457bc197b22f41b54b7dd6a79e195cdc037f9cc55f50e3e4332ebf6988",
    # h2direct.DirectData encodes frames into h2 and a Flusher writes them:
    # correct only while whoever takes h2's output (this _flush) takes the
    # send lock before any other task runs, while the send task pops a
    # stream's buffer and encodes it without a schedule point between, and
    # while stream_send / _create_stream keep stream_buffers per stream
    # (stream_send is also fix 7 of hypercorn_fixes, _send_data fix 8)
    "hypercorn.protocol.h2.H2Protocol._flush":
        "1a771e85178d124c6e2420e89ec750159929b76267fc07dd3d798bb6f72db77a",
    "hypercorn.protocol.h2.H2Protocol._send_data":
        "a89ce4286f36982057297d5c3302777cbcdb303c52eeb0936feaf5d95dd88eef",
    "hypercorn.protocol.h2.H2Protocol.stream_send":
        "d8fc824e2770ba5c7af707fc01e14eb2eaef377064221ec84009fa8d949fe90b",
    "hypercorn.protocol.h2.H2Protocol._create_stream":
        "91eb123ddf247ede84f6766ae1ecb49ab0a7d2fad59490f1adfe7694c738b686",
    # ... and h2direct.direct_data finds the stream's protocol through the
    # app's send, the bound HTTPStream.app_send this spawns the app with
    "hypercorn.protocol.http_stream.HTTPStream.handle":
        "6ed2e34c5e708c6aae3d2c9f56c7088379602ee3e1dbf406cd45024b3ed0a7db",
    # LightTaskGroup.spawn_app replaces it (server/connection.py)
    "hypercorn.trio.task_group.TaskGroup.spawn_app":
        "b4c113142752980160de608565f528e17bd0e7663099a62ff69d04525b40000e",
    # ... and calls this private function with its positional signature
    "hypercorn.trio.task_group._handle":
        "06081a56a9930825919e01e08ad2b2ffaae5508f065bcfced89cd3082db2192f",
    # ServerApp is this wrapper without its coroutine frame (server/asgi.py)
    "hypercorn.app_wrappers.ASGIWrapper.__call__":
        "5d03a825739dd4e84c996dac5a1df4c6ff2e023e58c4abc4554d86d158f16ea4",
    # IdleTimer replaces the connection's idle task (server/connection.py)
    "hypercorn.trio.worker_context.TrioSingleTask.restart":
        "0170ab8e4418dc0e900c10c9c2730196aecd78920db25aea967991657eed39c8",
    "hypercorn.trio.worker_context.TrioSingleTask.stop":
        "044ad384dfd2f56515809b3e0d347a6aabccd50237349b5ddc6a2fdcf5f25a19",
    # replaced for the process by hypercorn_fixes (fixes 1 to 6; 7 and 8 above)
    "hypercorn.protocol.h2.StreamBuffer.pop":
        "9eb73c8833891346cbd8658fdd2ac29da8336007abab40a711db857f9c7280e6",
    "hypercorn.protocol.h2.H2Protocol._handle_events":
        "3378aef0a2348f0def6e0044697ba0623985794f9b186efb5fbaf12733f4feb5",
    "hypercorn.protocol.h11.H11Protocol.__init__":
        "c7c989fd6a352626afee9d339296d51b2db1dfa05ad75ccdc7080799d6d6a5a3",
    "hypercorn.protocol.h11.H11Protocol._send_error_response":
        "58c2b47ae295d000c65a2216fa6afd9efb1ea05363a40d5dbf427b1d2b41b4c7",
    "hypercorn.protocol.h2.H2Protocol._priority_updated":
        "a02ffc3670a3292e97bcfb215ac789a4a2bbc5a8f1cbf44c47e4882d19ac47da",
    "hypercorn.protocol.h2.H2Protocol.initiate":
        "fc365390735cd1b99fc32b01d8c3eb6e8b2a3d893a92a2793411aac71dcc6035",
    # ServerH11Connection (hypercorn_fixes) overrides these private methods of h11
    "h11.Connection._extract_next_receive_event":
        "c0fc7051975f7a5b661f541f55f50bfd52066bffd6a208bdf09d8c54a4184c87",
    "h11.Connection._clean_up_response_headers_for_sending":
        "a190401e4767c6414c345892d44596a3bf982099707984b507166bc814fb0b3f",
    # ... whose Connection: close announces the close this method makes
    "hypercorn.protocol.h11.H11Protocol._maybe_recycle":
        "3ac53f52bc4e65de7e9b898df5c1c76c9865479e2821ed524acdf426c2075a88",
}  # fmt: skip

#: The originals of the methods hypercorn_fixes replaces (the class
#: attributes may be the fixed ones once a server ran in this process).
ORIGINALS = {
    "hypercorn.protocol.h2.StreamBuffer.pop": hypercorn_fixes.original_pop,
    "hypercorn.protocol.h2.H2Protocol._handle_events": hypercorn_fixes.original_handle_events,
    "hypercorn.protocol.h11.H11Protocol.__init__": hypercorn_fixes.original_h11_init,
    "hypercorn.protocol.h11.H11Protocol._send_error_response": (
        hypercorn_fixes.original_send_error_response
    ),
    "hypercorn.protocol.h2.H2Protocol._priority_updated": hypercorn_fixes.original_priority_updated,
    "hypercorn.protocol.h2.H2Protocol.initiate": hypercorn_fixes.original_initiate,
    "hypercorn.protocol.h2.H2Protocol.stream_send": hypercorn_fixes.original_stream_send,
    "hypercorn.protocol.h2.H2Protocol._send_data": hypercorn_fixes.original_send_data,
}


def _resolve(dotted: str) -> Any:
    if dotted in ORIGINALS:
        return ORIGINALS[dotted]
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def test_the_fork_is_of_the_hypercorn_installed() -> None:
    """The fork was written against hypercorn 0.18.0 and h11 0.16.0, and that is what runs."""
    assert metadata.version("hypercorn") == hypercorn_fixes.FIXED_VERSION == "0.18.0"
    assert metadata.version("h11") == "0.16.0"


def test_every_copied_or_overridden_hypercorn_function_is_unchanged() -> None:
    """Each hypercorn function the fork copies or overrides has the exact
    source it had when the copy was made: a change in any of them (a new
    release) fails here, naming the functions to re-read."""
    changed = [
        dotted
        for dotted, digest in PINNED.items()
        if hashlib.sha256(inspect.getsource(_resolve(dotted)).encode()).hexdigest() != digest
    ]
    assert changed == [], f"re-read trio_stream/server/ against: {changed}"


class _Socket:
    """What DirectBody writes to: records each frame; the kernel takes all."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send_nowait(self, data: bytes | memoryview) -> int:
        self.frames.append(bytes(data))
        return len(data)


async def test_the_direct_body_frames_chunks_exactly_as_h11() -> None:
    """The direct body path writes a chunked body's middle chunks itself and
    leaves the last one and the terminator to h11.  That is only correct if
    (1) its frame of a chunk is byte for byte the one h11 writes for the same
    data, and (2) h11, having written the head and the first chunk, still
    ends the body with the plain terminator after chunks it never saw (it
    keeps no count of chunked bytes)."""
    socket = _Socket()

    async def broken() -> None:
        raise AssertionError("the fake socket never breaks")

    direct = DirectBody(Link(cast(Any, socket), trio.Lock(), broken))
    server = h11.Connection(h11.SERVER)
    server.receive_data(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(server.next_event(), h11.Request)
    head = server.send(h11.Response(status_code=200, headers=[("content-type", "text/x")]))
    assert head is not None
    assert b"transfer-encoding: chunked" in head.lower()
    first = server.send(h11.Data(data=b"first"))
    for data in (b"data: token 1\n\n", b"x" * 300, b"\xe2\x9c\x93"):
        assert await direct.send(data)
        assert socket.frames[-1] == server.send(h11.Data(data=data))
    assert first == b"5\r\nfirst\r\n"
    assert server.send(h11.Data(data=b"last")) == b"4\r\nlast\r\n"
    assert server.send(h11.EndOfMessage()) == b"0\r\n\r\n"
