"""What hypercorn's worker calls per request (a copy of its ``ASGIWrapper``, lighter)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from ..http.asgi import Receive, Scope, Send


class ServerApp:
    """What hypercorn's worker calls per request: hypercorn's ``ASGIWrapper``
    without its ``async def``.

    ``__call__`` hands back the app's own coroutine, so the request task
    awaits the app directly: one coroutine frame fewer for as long as the
    request lives (an open stream holds its request task's whole chain).
    """

    __slots__ = ("app",)

    def __init__(self, app: Callable[[Scope, Receive, Send], Coroutine[Any, Any, None]]) -> None:
        self.app = app

    def __call__(
        self, scope: Any, receive: Any, send: Any, sync_spawn: Any, call_soon: Any
    ) -> Coroutine[Any, Any, None]:
        return self.app(scope, receive, send)
