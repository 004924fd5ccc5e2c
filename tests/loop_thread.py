"""An event loop of its own, run by a thread of its own: the test servers (HTTP, RTSP) live
there, so neither a test's loop nor a blocking PyAV read in a reader thread ever starves them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run(self, make: Callable[[], Awaitable[Any]], timeout_s: float = 10) -> Any:
        """`await make()` on the loop, from another thread, and its result."""
        async def call() -> Any:
            return await make()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout_s)

    def close(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        """`await cleanup()` on the loop, then end every task still there (handlers of clients
        that left, a hung request), stop the loop and its thread."""
        async def stop() -> None:
            await cleanup()
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)

        self.run(stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
