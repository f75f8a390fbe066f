"""The HTTP layer: the ASGI app, its handlers, and the service it serves.

Owns the ASGI app and its routes (:mod:`.app`), the chat-completion and run
handlers (:mod:`.chat`), the Responses API handlers (:mod:`.responses`),
what both share -- reading a body, the one subscriber factory, the request
nurseries (:mod:`.common`) -- the
subscriber that writes a run to one client (:mod:`.stream`), raw-ASGI helpers
(:mod:`.asgi`), the guarded transport and direct HTTP/1.1 body that the
writer uses (:mod:`.transport`), the browser playground (:mod:`.playground`
and its files) and the service (:mod:`.service`: what one server instance
owns, and admission).

May import: :mod:`trio_stream.runs` and every layer below it.  Never
:mod:`trio_stream.server`, which sits above and serves this app.
"""
