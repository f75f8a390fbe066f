"""trio-stream: an OpenAI-compatible SSE streaming server on Trio.

The public API::

    from trio_stream import Settings, serve

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, Settings(port=0, db=":memory:"))

Everything not imported here is private.
"""

from .config import Settings
from .errors import ApiError, ConfigError, TrioStreamError, UpstreamError
from .http.app import TrioStreamApp
from .http.service import Service, open_service
from .logs import EventLogger, RecordingSink
from .server.serve import serve, serve_service

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "ConfigError",
    "EventLogger",
    "RecordingSink",
    "Service",
    "Settings",
    "TrioStreamApp",
    "TrioStreamError",
    "UpstreamError",
    "__version__",
    "open_service",
    "serve",
    "serve_service",
]
