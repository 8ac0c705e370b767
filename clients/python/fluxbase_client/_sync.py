"""The synchronous client: the async one running on a private event loop in a daemon thread.

One implementation serves both APIs, so they can never drift apart: every call is sent to the
loop and waited for; objects the async client returns (queries, channels) come back wrapped.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Iterator
from typing import Any

from fluxbase_client._client import AsyncFluxbase, Query
from fluxbase_client.auth import Auth
from fluxbase_client.realtime import Channel, Realtime
from fluxbase_client.storage import Storage

_WRAP = (Query, Auth, Storage, Realtime, Channel)


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fluxbase-client", daemon=True)
        self.thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class _Proxy:
    def __init__(self, target: Any, loop: _Loop):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_loop", loop)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if inspect.ismethod(value) or inspect.isfunction(value):

            def call(*args: Any, **kwargs: Any) -> Any:
                if inspect.iscoroutinefunction(value):
                    return self._wrap(self._loop.run(value(*args, **kwargs)))
                if inspect.isasyncgenfunction(value):
                    return self._iterate(value(*args, **kwargs))
                return self._wrap(value(*args, **kwargs))

            return call
        return self._wrap(value)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    def _wrap(self, value: Any) -> Any:
        if value is self._target:
            return self
        return _Proxy(value, self._loop) if isinstance(value, _WRAP) else value

    def _iterate(self, agen: Any) -> Iterator[Any]:
        while True:
            try:
                yield self._loop.run(agen.__anext__())
            except StopAsyncIteration:
                return

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self._target, Channel):
            return self._iterate(self._target.__aiter__())
        raise TypeError(f"{type(self._target).__name__} is not iterable")

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Fluxbase(_Proxy):
    """The same API as AsyncFluxbase, blocking: `Fluxbase(url, project_id, api_key).sql(...)`."""

    def __init__(self, *args: Any, **kwargs: Any):
        loop = _Loop()

        async def make() -> AsyncFluxbase:
            return AsyncFluxbase(*args, **kwargs)

        super().__init__(loop.run(make()), loop)

    def close(self) -> None:
        self._loop.run(self._target.aclose())
        self._loop.stop()
