"""The serving path: hypercorn's trio worker, assembled, patched and owned here.

Owns everything that copies or patches hypercorn (the connection and task
group, the HTTP/2 fixes), ``serve()`` and its shutdown, and the multi-process
supervisor (``--workers``).

May import: :mod:`trio_stream.http` and every layer below it.
"""
