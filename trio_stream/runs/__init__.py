"""The trio driver of runs: tasks, cancel scopes and deadlines around the log.

Owns :class:`~.manager.Run` (one upstream completion in flight, its scope and
its wake-ups) and :class:`~.manager.RunManager` (starting, superseding,
cancelling, saving and expiring runs, locally or across a cluster).

May import: every lower layer -- :mod:`trio_stream.core`,
:mod:`trio_stream.wire`, :mod:`trio_stream.upstream`,
:mod:`trio_stream.store`, :mod:`trio_stream.shared` -- and the top-level
:mod:`~trio_stream.config`, :mod:`~trio_stream.errors`,
:mod:`~trio_stream.logs`, :mod:`~trio_stream.metrics`.  Never the HTTP layer.
"""
