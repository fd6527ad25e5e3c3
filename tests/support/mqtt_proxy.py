"""A TCP proxy between MQTT clients and a real broker that can lose PUBACKs.

Everything passes through byte for byte, both ways, except that while
`drop_pubacks` is true every PUBACK (packet type 4, in MQTT 3.1.1 and 5) from
the broker to a client is swallowed and counted: a broker that takes QoS 1
messages and never acknowledges them. The broker-to-client direction is cut
into whole packets (fixed header byte, "remaining length" varint of up to 4
bytes, body), however the reads split them; the other direction is copied as
it comes.

It runs its own event loop in a thread, so tests drive it from plain code
while the daemon under test runs as a separate process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

PUBACK = 4


class MalformedPacket(ValueError):
    pass


def split_packets(buffer: bytearray) -> list[bytes]:
    """Remove the whole MQTT packets at the start of `buffer` and return them;
    an incomplete packet is left in `buffer` for the next read."""
    packets = []
    while len(buffer) >= 2:
        remaining, multiplier, index = 0, 1, 1
        while True:
            if index > 4:
                raise MalformedPacket("remaining length longer than 4 bytes")
            if index >= len(buffer):
                return packets  # the length itself is split across reads
            byte = buffer[index]
            remaining += (byte & 0x7F) * multiplier
            multiplier *= 128
            index += 1
            if not byte & 0x80:
                break
        total = index + remaining
        if len(buffer) < total:
            return packets
        packets.append(bytes(buffer[:total]))
        del buffer[:total]
    return packets


class MqttProxy:
    """Listens on 127.0.0.1 (`.port`) and relays each connection to the broker."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", *,
                 drop_pubacks: bool = True):
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.drop_pubacks = drop_pubacks  # tests flip it at will
        self.port = 0
        self.pubacks_dropped = 0
        self.connections = 0
        self.connected_at: list[float] = []  # time.monotonic() of each relayed connection
        self.to_client: Counter[int] = Counter()  # packet type -> packets relayed to clients
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="mqtt-proxy")

    def start(self) -> MqttProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self.port = future.result(10)
        return self

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            self._abort()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def abort_connections(self) -> None:
        """Cut every relayed connection without a word, as a dead network does."""
        async def abort() -> None:
            self._abort()

        asyncio.run_coroutine_threadsafe(abort(), self._loop).result(5)

    def _abort(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    # -- a connection ----------------------------------------------------------

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                broker_reader, broker_writer = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port)
            except OSError:
                client_writer.transport.abort()
                return
            self.connections += 1
            self.connected_at.append(time.monotonic())
            self._writers |= {client_writer, broker_writer}
            upstream = asyncio.create_task(self._copy(client_reader, broker_writer))
            try:
                if await self._relay_to_client(broker_reader, client_writer):
                    client_writer.close()  # the broker hung up: flush, then close
                    await asyncio.wait_for(client_writer.wait_closed(), 5)
            except (ConnectionError, OSError, TimeoutError):
                pass
            finally:
                upstream.cancel()
                await asyncio.gather(upstream, return_exceptions=True)
                for writer in (client_writer, broker_writer):
                    self._writers.discard(writer)
                    writer.transport.abort()
        finally:
            self._tasks.discard(task)

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Client to broker: as it comes. At the client's EOF, pass the EOF on."""
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()

    async def _relay_to_client(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> bool:
        """Broker to client, packet by packet, without the PUBACKs while dropping.
        True when the broker closed the connection in good order."""
        buffer = bytearray()
        try:
            while data := await reader.read(65536):
                buffer += data
                relayed = []
                for packet in split_packets(buffer):
                    kind = packet[0] >> 4
                    if kind == PUBACK and self.drop_pubacks:
                        self.pubacks_dropped += 1
                        continue
                    self.to_client[kind] += 1
                    relayed.append(packet)
                if relayed:
                    writer.write(b"".join(relayed))
                    await writer.drain()
        except (ConnectionError, OSError, MalformedPacket):
            return False
        return True
