"""The HTTP layer: the ASGI app, its handlers, and the service it serves.

Owns the ASGI app and its one routing table (:mod:`.app`, :mod:`.routing`),
the chat-completion and run handlers (:mod:`.chat`), the Responses API
handlers (:mod:`.responses`), what both share -- reading a body, the one
subscriber factory, the request nurseries (:mod:`.common`) -- the subscriber
that writes a run to one client (:mod:`.stream`), raw-ASGI helpers
(:mod:`.asgi`), the guarded transport and direct HTTP/1.1 body that the
writer uses (:mod:`.transport`), the browser playground (:mod:`.playground`
and its files) and the service (:mod:`.service`: what one server instance
owns, and admission).

It is the only layer that speaks HTTP: the layers below raise their own
exceptions, and :func:`~trio_stream.http.asgi.as_api_error` (raw routes) and
the app's error handlers (Quart routes) answer them.

May import: :mod:`trio_stream.runs` and every layer below it.  Never
:mod:`trio_stream.server`, which sits above and serves this app.
"""
