"""The sans-IO wire layer: bytes in, objects out, and back.

Owns SSE framing and decoding (:mod:`.sse`), request parsing and validation
(:mod:`.request`), chat-completion chunk encoding (:mod:`.chunks`), the
Responses API's events and objects (:mod:`.responses`) and token usage
(:mod:`.usage`).

May import: :mod:`trio_stream.core`, :mod:`trio_stream.errors`,
:mod:`trio_stream.config`.  Never imports trio.
"""
