"""The trio driver of runs: tasks, cancel scopes and deadlines around the log.

Owns :class:`~.run.Run` (one upstream completion in flight: its log, scope
and wake-ups), :class:`~.manager.RunManager` (starting, driving, superseding,
cancelling and ending this process's runs), the save-and-retry loop
(:mod:`.saving`) and :class:`~.cluster.Cluster` (runs that other nodes own).

Raises no HTTP error: what it cannot do it says with its own exceptions
(:class:`~trio_stream.shared.SharedUnavailable`,
:class:`~trio_stream.errors.UpstreamError`), and the HTTP layer answers them.

May import: every lower layer -- :mod:`trio_stream.core`,
:mod:`trio_stream.wire`, :mod:`trio_stream.upstream`,
:mod:`trio_stream.store`, :mod:`trio_stream.shared` -- and the top-level
:mod:`~trio_stream.config`, :mod:`~trio_stream.errors`,
:mod:`~trio_stream.logs`, :mod:`~trio_stream.metrics`.  Never the HTTP layer.
"""

from .cluster import Cluster
from .manager import RunManager
from .run import Done, Run, follow_page, new_run_id
from .supersede import SHARED_TIMEOUT

__all__ = ["SHARED_TIMEOUT", "Cluster", "Done", "Run", "RunManager", "follow_page", "new_run_id"]
