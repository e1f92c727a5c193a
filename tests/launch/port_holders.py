"""A program holding a TCP port, as the one that made the README's main job fail: it either answers
every connection (another server) or accepts and never says a word (the case that used to hang
torchrun silently). Runs as a thread of the test; counts the connections it was offered.
"""

from __future__ import annotations

import errno
import socket
import threading


class PortHolder(threading.Thread):
    """Listen on `port` (0: a free one) on every IPv4 address until `close()`."""

    def __init__(self, kind: str, port: int = 0) -> None:
        super().__init__(daemon=True, name=f"port-holder-{kind}")
        if kind not in ("answering", "silent"):
            raise ValueError(kind)
        self.kind = kind
        self.connections = 0
        self._open: list[socket.socket] = []
        self._closed = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(("0.0.0.0", port))
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.start()

    def run(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            if self.kind == "answering":
                try:
                    conn.sendall(b"HTTP/1.0 200 OK\r\ncontent-length: 6\r\n\r\nhello\n")
                except OSError:
                    pass
                conn.close()
            else:
                self._open.append(conn)  # accepted, and never a byte back

    def close(self) -> None:
        self._closed.set()
        self.join(timeout=5)
        for conn in self._open:
            conn.close()
        self.sock.close()


def hold(kind: str, preferred: int) -> PortHolder:
    """Hold `preferred` if no one else does; otherwise (another test or program has it, which is
    itself the situation under test) hold a free port, which the caller then configures."""
    try:
        return PortHolder(kind, preferred)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        return PortHolder(kind, 0)
