"""A small HTTP/1.1 proxy in front of a real firm-serve that misbehaves on demand.

Each POST takes the next fault from its queue, if any: "429:S" (answer 429 with Retry-After S),
"503", "422", "drop" (close the connection without answering) or "slow:S" (wait S seconds, then
forward). Without a fault it forwards to the upstream server. It records the X-Request-ID of
every POST, so tests can see that retries of one call share an id. It runs on its own event loop
thread inside the test process.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque

import httpx


class FlakyProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults: deque[str] = deque()
        self.request_ids: list[str] = []
        self.posts = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._http.aclose()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._http = httpx.AsyncClient(base_url=self.upstream, timeout=120)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if not await self._answer(method, path, headers, body, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        fault = ""
        if method == "POST":
            self.posts += 1
            self.request_ids.append(headers.get("x-request-id", ""))
            fault = self.faults.popleft() if self.faults else ""
        kind, _, arg = fault.partition(":")
        if kind == "drop":
            return False
        if kind in ("429", "503", "422"):
            extra = {"Retry-After": arg} if arg else {}
            error = json.dumps({"error": {"code": f"fault_{kind}", "message": "injected"}}).encode()
            self._respond(writer, int(kind), error, extra)
            await writer.drain()
            return True
        if kind == "slow":
            await asyncio.sleep(float(arg))
        forwarded = {k: v for k, v in headers.items() if k in ("content-type", "authorization", "x-request-id")}
        response = await self._http.request(method, path, content=body, headers=forwarded)
        self._respond(
            writer,
            response.status_code,
            response.content,
            {"Content-Type": response.headers.get("content-type", "application/json")},
        )
        await writer.drain()
        return True

    @staticmethod
    def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, headers: dict[str, str]) -> None:
        head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(head.encode("latin-1") + b"\r\n" + body)
