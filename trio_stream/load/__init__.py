"""``trio-stream load``: a load generator that checks every token it receives.

In-process use (tests, ``tools/bench.py``)::

    from trio_stream.load import LoadConfig, run_load

    report = await run_load(LoadConfig(url=f"http://127.0.0.1:{port}", requests=50))

The report's shape is documented in :func:`~trio_stream.load.accounting.build_report`.
"""

from .plan import SCENARIOS, LoadConfig
from .runner import run_load

__all__ = ["SCENARIOS", "LoadConfig", "run_load"]
