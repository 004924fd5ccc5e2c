"""How many decoded pixels the /predict requests hold at once. An upload is small and its
pixels are not (a 115 KB PNG of 6300x6300 decodes to 119 MB), so the upload limit alone let a
few concurrent requests take several GB. A request reserves each chunk's pixels, read from the
image headers, before decoding it, and gives them back once the chunk's answers are in; a chunk
waits its turn (first come, first served) while others hold the budget, and one larger than
the whole budget runs alone."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class PixelBudget:
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.held = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        await self._acquire(pixels)
        try:
            yield
        finally:
            self._release(pixels)

    async def _acquire(self, pixels: int) -> None:
        if not self._waiting and self._fits(pixels):
            self.held += pixels
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append((pixels, turn))
        try:
            await turn
        except BaseException:  # cancelled (the client went away)
            if turn.done() and not turn.cancelled():  # given its turn just before: give it back
                self._release(pixels)
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove((pixels, turn))
                self._wake()  # the next in line may fit now
            raise

    def _fits(self, pixels: int) -> bool:
        return self.held == 0 or self.held + pixels <= self.budget

    def _release(self, pixels: int) -> None:
        self.held -= pixels
        self._wake()

    def _wake(self) -> None:
        """Give turns in order, while the first in line fits."""
        while self._waiting and self._fits(self._waiting[0][0]):
            pixels, turn = self._waiting.popleft()
            if not turn.done():  # else cancelled, its waiter not yet resumed
                self.held += pixels
                turn.set_result(None)
