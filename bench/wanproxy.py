"""A userspace TCP proxy that makes loopback look like a WAN link to an object store (bench only).

    python bench/wanproxy.py --listen 127.0.0.1:0 --upstream 127.0.0.1:8333 \
        --conn-rate 6M --link-rate 48M --delay-ms 15

Per direction of every connection, each chunk read from one side is written to the other no sooner
than `delay` after it was read, and no faster than both the connection's rate (`--conn-rate`, bytes/s)
and the link's (`--link-rate`, shared by all connections in that direction: a full-duplex link).
The reader paces itself to those rates and keeps at most `window` bytes queued per direction, so a
sender is held back by TCP flow control, as on a real path, instead of filling the proxy's memory. A
new connection waits one round trip (2 x delay) before it is connected upstream, like a TCP handshake
over the WAN. Object stores serve each connection far below a host's link, which is what
`--conn-rate` models; `--link-rate` is the host's uplink/downlink.

Why not `tc`: netem is not available on this kernel and tbf shapes only a whole interface; a proxy
shapes per connection, which is the effect that matters (how many connections a tool keeps busy).
Prints `LISTEN host:port` on stdout once ready; SIGTERM stops it. Counters (bytes per direction,
connections) go to stderr on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

CHUNK = 64 * 1024


def parse_rate(text: str) -> float:
    units = {"k": 1e3, "m": 1e6, "g": 1e9}
    text = text.strip().lower().rstrip("b/s")
    return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)


class Link:
    """One direction of the shared link: the time at which it is free again."""

    def __init__(self, rate: float) -> None:
        self.rate, self.free_at, self.bytes = rate, 0.0, 0


class Shaper:
    def __init__(self, upstream: tuple[str, int], conn_rate: float, link_rate: float, delay: float) -> None:
        self.upstream, self.conn_rate, self.delay = upstream, conn_rate, delay
        self.links = {"up": Link(link_rate), "down": Link(link_rate)}
        # enough in flight per direction to fill the connection's share of the path, and then some
        self.window = max(4 * CHUNK, int(2 * conn_rate * max(delay, 0.001)) + 2 * CHUNK)
        self.connections = 0

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        await asyncio.sleep(2 * self.delay)  # the handshake's round trip
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            self.pump(client_r, up_w, self.links["up"]),
            self.pump(up_r, client_w, self.links["down"]),
            return_exceptions=True,
        )
        for w in (client_w, up_w):
            w.close()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        queued = [0]
        room = asyncio.Event()
        room.set()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
                queued[0] -= len(data)
                if queued[0] < self.window:
                    room.set()
            if writer.can_write_eof():
                writer.write_eof()

        sender = asyncio.ensure_future(deliver())
        conn_free = 0.0
        try:
            while True:
                await room.wait()
                data = await reader.read(CHUNK)
                now = loop.time()
                if not data:
                    break
                # serialisation: at the connection's rate, then on the shared link (FIFO reservation)
                start = max(now, conn_free)
                conn_free = start + len(data) / self.conn_rate
                on_link = max(conn_free - len(data) / link.rate, link.free_at)
                link.free_at = on_link + len(data) / link.rate
                done = max(conn_free, link.free_at)
                link.bytes += len(data)
                queued[0] += len(data)
                if queued[0] >= self.window:
                    room.clear()
                queue.put_nowait((done + self.delay, data))
                pace = done - self.delay - loop.time()  # read ahead by one delay at most
                if pace > 0:
                    await asyncio.sleep(pace)
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((0.0, b""))
            try:
                await sender
            except (ConnectionError, OSError):
                pass


async def serve(args: argparse.Namespace) -> None:
    host, port = args.listen.rsplit(":", 1)
    up_host, up_port = args.upstream.rsplit(":", 1)
    shaper = Shaper(
        (up_host, int(up_port)), parse_rate(args.conn_rate), parse_rate(args.link_rate), args.delay_ms / 1000.0
    )
    server = await asyncio.start_server(shaper.handle, host, int(port), backlog=512)
    bound = server.sockets[0].getsockname()
    print("LISTEN %s:%d" % (bound[0], bound[1]), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    async with server:
        await stop.wait()
    links: dict[str, int] = {k: v.bytes for k, v in shaper.links.items()}
    print(
        "wanproxy: %d connections, up %d bytes, down %d bytes in %.1f s"
        % (shaper.connections, links["up"], links["down"], time.monotonic() - started),
        file=sys.stderr,
    )


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--conn-rate", default="6M", help="bytes/s per connection and direction")
    ap.add_argument("--link-rate", default="48M", help="bytes/s per direction, all connections together")
    ap.add_argument("--delay-ms", type=float, default=15.0, help="one-way delay (RTT = 2x)")
    asyncio.run(serve(ap.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
