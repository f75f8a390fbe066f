"""The serving path: a fork of hypercorn 0.18.0's trio worker, owned here.

We do not call ``hypercorn.trio.serve``: this package assembles hypercorn's
pieces itself, copies the few it has to change, and patches two bugs.
Everything that copies or patches hypercorn lives here, and
``tests/test_hypercorn_fork.py`` pins every copied or overridden hypercorn
function by the SHA-256 of its source, so a new hypercorn release fails that
test until the copies are re-read.  What differs from hypercorn, and why:

* :mod:`.serve` -- ``serve()`` builds the worker from hypercorn's parts
  (``TCPServer`` per connection, trio's accept loop) around our guarded
  transport, and shuts down as docs/api.md section 3.7 says (503, grace
  period, cancel and save, cut the transports).  Its ``Connection`` closes a
  connection in a shielded scope with a deadline (``TCPServer._close`` was
  cancelled before the FIN when the app's disconnect watcher cancelled the
  very task that was closing).
* :mod:`.connection` -- ``LightTCPServer.run`` is ``TCPServer.run`` with a
  lighter read loop (no ``fail_after(inf)``; on plain TCP it waits for
  readability itself), no handshake deadline on a plain connection, and a
  task group (``LightTaskGroup.spawn_app``, calling hypercorn's private
  ``_handle``) whose app inbox is one slotted object instead of a memory
  channel: an idle open stream holds kilobytes less.  Its ``IdleTimer``
  replaces hypercorn's ``TrioSingleTask``, whose restart (from inside the
  app's last ``send()``) a disconnect watcher's cancel stopped halfway, so an
  idle keep-alive connection was never closed.  It also publishes the
  connection's send lock and stream to its request tasks, for the direct
  HTTP/1.1 body (``trio_stream.http.transport.DirectBody``, which frames
  chunks exactly as h11 does: checked by the same test) and, through
  ``LightTaskGroup.spawn_app``, each HTTP/2 stream's ``h2direct.DirectData``.
* :mod:`.asgi` -- ``ServerApp`` is hypercorn's ``ASGIWrapper`` without its
  ``async def``: one coroutine frame fewer per open request.
* :mod:`.hypercorn_fixes` -- bugs of 0.18.0, fixed for the process only on
  that version: ``StreamBuffer.pop`` (an unbounded HTTP/2 buffer behind a
  zero window), ``H2Protocol._handle_events`` (a ``KeyError`` that stopped
  the server), ``H11Protocol.__init__`` (each connection's h11 state machine
  caps a complete head at 16 KiB and drops what follows a connection's last
  request; it overrides h11's private ``_extract_next_receive_event``),
  ``H11Protocol._send_error_response`` (an error h11 refuses is answered
  with an OpenAI error body), ``H2Protocol._priority_updated`` (PRIORITY
  frames are ignored: hypercorn put every such stream in its priority tree,
  which refused the 1,001st with an error nothing caught),
  ``H2Protocol.initiate`` (an h2c connection by prior knowledge is armed with
  the idle timer, so one that never opens a stream is closed),
  ``H2Protocol.stream_send`` (a stream that ends while the server terminates
  says ``END_STREAM`` before the connection's GOAWAY) and
  ``H2Protocol._send_data`` (a stream the client reset leaves hypercorn's
  priority tree and buffers; it stayed there, and the 1,001st ended the
  connection).
* :mod:`.h2direct` -- the direct DATA path of HTTP/2 (h2c and TLS): a body
  chunk that fits its window is encoded into ``h2`` by the request task
  (``encode_data``, what ``h2``'s ``send_data`` does without the frame
  object) and a flusher task per connection writes the frames of a
  scheduler batch in one write, under hypercorn's send lock; it reads
  hypercorn's ``H2Protocol`` state (``stream_buffers``, ``connection``,
  ``closed``), pinned by the canary.
  ``LightTCPServer`` also ends only its own connection when anything in it
  raises, and says GOAWAY before an idle close
  (``_initiate_server_close``).
* :mod:`.signals` and :mod:`.workers` -- serving until SIGTERM/SIGINT, and
  ``--workers N`` processes on one listening socket.

May import: :mod:`trio_stream.http` and every layer below it.
"""
