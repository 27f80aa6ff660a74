"""A small MLLP receiver for tests: an EHR that records what it gets and answers as told.

Typical use::

    with MLLPSink() as sink:                  # 127.0.0.1, a free port, answers AA
        ...send to sink.port...
        sink.reply = "AE"                     # change the answer at run time
        sink.wait_for(2)
        assert sink.received[1] == message
        sink.stop(); sink.start()             # down, then up again on the same port

Replies: ``AA``, ``AE``, ``AR``, ``CA``, ``CE``, ``CR`` (with :attr:`MLLPSink.text` as MSA-3
and ERR on the error codes), ``WRONG_ID`` (AA for another MSH-10), ``NONE`` (keep the
connection, never answer) and ``CLOSE`` (close the connection without answering).
:attr:`MLLPSink.delay` (seconds) makes it a slow EHR: it waits that long before answering.
Framing, header reading and the ACK come from the gateway's own ``gateway.hl7`` modules.
It runs an asyncio loop on a background thread; every message is recorded before the
reply is decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import ssl
import threading
import time
from types import TracebackType
from typing import Literal

from gateway.hl7.ack import build_ack
from gateway.hl7.mllp import frame, read_frame
from gateway.hl7.msh import HeaderError, parse_header

__all__ = ["MLLPSink", "Reply"]

Reply = Literal["AA", "AE", "AR", "CA", "CE", "CR", "WRONG_ID", "NONE", "CLOSE"]


class MLLPSink:
    """An MLLP server on 127.0.0.1; *port* 0 picks a free one (kept across restarts)."""

    def __init__(
        self,
        *,
        port: int = 0,
        reply: Reply = "AA",
        text: str = "Sink says no",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.port = port
        self.reply: Reply = reply
        self.text = text
        self.delay = 0.0  # seconds to wait before each answer
        self._ssl = ssl_context
        self._lock = threading.Lock()
        self._received: list[bytes] = []
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def received(self) -> list[bytes]:
        """Every message received so far, in order (a copy)."""
        with self._lock:
            return list(self._received)

    @property
    def connections(self) -> int:
        """How many connections were accepted since the sink was created."""
        with self._lock:
            return self._connections

    def wait_for(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Block until at least *count* messages arrived; return them."""
        deadline = time.monotonic() + timeout
        while len(got := self.received) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sink got {len(got)} messages, expected {count}")
            time.sleep(0.01)
        return got

    def start(self) -> MLLPSink:
        if self._thread is not None:
            raise RuntimeError("the sink is already running")
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self._ssl)
                )
            except BaseException as exc:
                failure.append(exc)
                started.set()
                loop.close()
                return
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="mllp-sink", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            self._thread.join()
            self._thread = self._loop = None
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listening socket and every open connection (the EHR goes down)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = self._server = None
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        with self._lock:
            self._connections += 1
        try:
            while True:
                payload = await read_frame(reader, 16 * 1024 * 1024)
                if payload is None:
                    return
                with self._lock:
                    self._received.append(payload)
                    reply, text, delay = self.reply, self.text, self.delay
                if delay:
                    await asyncio.sleep(delay)
                if reply == "CLOSE":
                    return
                if reply == "NONE":
                    continue
                writer.write(frame(self._ack(payload, reply, text)))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            return
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    @staticmethod
    def _ack(payload: bytes, reply: Reply, text: str) -> bytes:
        header = None
        with contextlib.suppress(HeaderError):
            header = parse_header(payload)
        code = reply
        if reply == "WRONG_ID":
            code = "AA"
            if header is not None:
                header = dataclasses.replace(header, control_id=header.control_id + "-OTHER")
        return build_ack(
            header,
            code,
            control_id=f"SINK{int(time.time() * 1000) % 10**9}",
            text=text,
            now=dt.datetime.now(dt.UTC),
        )

    def __enter__(self) -> MLLPSink:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
