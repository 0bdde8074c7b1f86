"""A minimal HTTP/1.1 keep-alive client for the benchmarks.

One connection, one request at a time, the request written in one piece, the response read by
its Content-Length. The server under test shares two cores with the benchmark's process;
httpx spends about a millisecond of CPU per request here, which made the single-event ingest
figure measure the client.
"""

from __future__ import annotations

import asyncio
import contextlib


class Http11:
    def __init__(self, base: str, token: str) -> None:
        address = base.split("://", 1)[1]
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.head = f"Host: {address}\r\nAuthorization: Bearer {token}\r\n".encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = b"%s %s HTTP/1.1\r\n" % (method.encode(), path.encode()) + self.head
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
        self.writer.write(head + b"\r\n" + (body or b""))
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        data = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, data

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        return await self.request("POST", path, body)

    async def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        return await self.request("GET", path)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None
