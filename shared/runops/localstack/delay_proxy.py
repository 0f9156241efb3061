"""A TCP proxy on loopback that adds latency, for tests and benchmarks (spec §0: moto is
CPU-bound, so offload-concurrency benchmarks put a delay in front of it instead).

Every segment read from one side is written to the other `delay` seconds after it arrived, in
order. Segments are pipelined, not serialized: a connection pays the delay once per direction
per round trip (like a long link), not once per segment, and concurrent connections do not
wait for each other. So N concurrent uploads through it take about one delay, N sequential
ones N delays.

    async with DelayProxy("127.0.0.1", moto_port, delay=0.05) as proxy:
        endpoint = f"http://127.0.0.1:{proxy.port}"

    python -m runops.localstack.delay_proxy --upstream 127.0.0.1:9000 --delay-ms 50 [--port P]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from types import TracebackType

from runops.localstack.ports import HOST

_READ_SIZE = 64 * 1024


class DelayProxy:
    """Listens on HOST:`port` (0: an ephemeral one) and forwards to `upstream_host:upstream_port`
    with `delay` seconds of one-way latency in each direction."""

    def __init__(
        self, upstream_host: str, upstream_port: int, *, delay: float, port: int = 0
    ) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay}")
        self.upstream = (upstream_host, upstream_port)
        self.delay = delay
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # Connections accepted so far (tests check traffic really went through the proxy).
        self.connections_accepted = 0

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._accept, HOST, self._port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> DelayProxy:
        return await self.start()

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                return  # upstream down: the client sees its connection closed
            pipes = [
                asyncio.create_task(self._pipe(reader, up_writer)),
                asyncio.create_task(self._pipe(up_reader, writer)),
            ]
            try:
                # A reset on one side ends the other too; a clean EOF is forwarded and waits.
                done, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
                if any(not t.cancelled() and t.exception() for t in done):
                    for p in pending:
                        p.cancel()
            finally:
                for p in pipes:
                    p.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
                up_writer.close()
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            writer.close()
            self._connections.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read segments as they come; a second task writes each one once its delay passed."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                queue.put_nowait((time.monotonic() + self.delay, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                await sender


async def _main(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    async with DelayProxy(host, int(port), delay=args.delay_ms / 1000, port=args.port) as proxy:
        print(f"delaying {args.delay_ms} ms: {HOST}:{proxy.port} -> {args.upstream}", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="A loopback TCP proxy that adds latency.")
    parser.add_argument("--upstream", required=True, help="host:port to forward to")
    parser.add_argument("--delay-ms", type=float, default=50.0, help="one-way latency")
    parser.add_argument("--port", type=int, default=0, help="listen port (0: ephemeral)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
