"""The sans-IO core of a run: what a run is, decided without any I/O.

Owns the run log and its state machine (:mod:`.log`), the table of what
happens when a run ends (:mod:`.lifecycle`) and the session table
(:mod:`.sessions`).  Every module here is a plain data structure or a pure
function, covered by synchronous tests.

May import: :mod:`trio_stream.errors` only.  Never imports trio.
"""
