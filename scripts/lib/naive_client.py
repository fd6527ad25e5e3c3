"""The naive reference client for scripts/bench: router.audio's getting-started
example, more or less. Read 4,000-frame chunks from ALSA, send each over the
WebSocket, print finals. No buffering, no reconnect, no MQTT.

    python naive_client.py URL API_KEY ALSA_DEVICE
"""

from __future__ import annotations

import asyncio
import json
import sys

import alsaaudio
from websockets.asyncio.client import connect


async def main(url: str, api_key: str, device: str) -> None:
    pcm = alsaaudio.PCM(alsaaudio.PCM_CAPTURE, device=device, rate=16000, channels=1,
                        format=alsaaudio.PCM_FORMAT_S16_LE, periodsize=4000)
    async with connect(url, additional_headers={"x-api-key": api_key}) as websocket:

        async def send() -> None:
            while True:
                _, data = await asyncio.to_thread(pcm.read)
                await websocket.send(data)

        async def receive() -> None:
            async for message in websocket:
                result = json.loads(message)
                if result.get("type") == "transcript" and not result.get("is_partial"):
                    print(result["transcript"], flush=True)

        await asyncio.gather(send(), receive())


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
