"""Run by test_core_crash: a service that starts a slow reply and prints READY; the test kills it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from bot.core.messages import IncomingMessage
from bot.core.service import ChatService
from tests.conftest import ToyEngines, toy_settings
from tests.sinks import RecordingSink


async def main(tmp: Path) -> None:
    service = ChatService(toy_settings(tmp, partial_save_s=0.1), engine_factory=ToyEngines(delay_s=0.05))
    await service.start()

    class Sink(RecordingSink):
        async def update(self, text: str) -> None:
            await super().update(text)
            if len(self.updates) == 12:  # ~0.6 s in: several partial saves have happened
                print("READY", flush=True)

    words = " ".join(f"w{i}" for i in range(500))
    await service.handle(IncomingMessage("test", "c1", "u1", "Ann", words), Sink())


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
