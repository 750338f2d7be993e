"""A small TCP proxy of our own, put between one process and a server to cut it off at will.

``blackhole()`` simulates a partition that silently drops packets: the proxy keeps every connection
open but forwards nothing more in either direction (what it reads is thrown away), so the client
sees neither an error nor an answer, the worst case for an agent (no reset, no FIN, its kernel even
gets TCP acknowledgements from ours). New connections are accepted and starved the same way.
``heal()`` forwards again (bytes dropped meanwhile are gone: those connections are broken for good,
as after a real partition, and the client has to reconnect).
"""

from __future__ import annotations

import socket
import threading
from contextlib import suppress
from types import TracebackType


class Proxy:
    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self._listener = socket.create_server((host, 0))
        self.host, self.port = self._listener.getsockname()[:2]
        self._dropping = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.connections = 0
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def url(self, database_url: str) -> str:
        """``database_url`` with its host and port replaced by the proxy's."""
        scheme, _, rest = database_url.partition("://")
        creds, _, hostpath = rest.rpartition("@")
        _, _, path = hostpath.partition("/")
        auth = f"{creds}@" if creds else ""
        return f"{scheme}://{auth}{self.host}:{self.port}/{path}"

    def blackhole(self) -> None:
        self._dropping.set()

    def heal(self) -> None:
        self._dropping.clear()

    def close(self) -> None:
        self._closed.set()
        with suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                # shutdown first: close() alone leaves the connection open while a pump thread is
                # blocked in recv() on it, and the server would keep its session.
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with suppress(OSError):
                    sock.close()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
                self.connections += 1
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            if self._dropping.is_set():
                continue  # dropped on the floor: no error, no answer
            try:
                dst.sendall(data)
            except OSError:
                break
        if not self._dropping.is_set():
            for sock in (src, dst):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
