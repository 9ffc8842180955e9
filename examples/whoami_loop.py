"""Opens a WebSocket through the gateway twice a second and prints which backend answered.

Usage: python3 examples/whoami_loop.py ws://127.0.0.1:8090/ [seconds]
"""
import asyncio
import sys
import time

import websockets


async def main(url: str, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        stamp = time.strftime("%H:%M:%S")
        try:
            async with websockets.connect(url, open_timeout=3) as ws:
                await ws.send("/whoami")
                first = (await ws.recv()).splitlines()[0]
                print(stamp, first.split()[0])
        except Exception as e:  # a refused upgrade or a dead gateway: show it and go on
            print(stamp, "error:", e)
        await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 60))
