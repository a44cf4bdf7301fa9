"""A TCP proxy for fault injection, in front of one target such as the broker.

::

    with Proxy("127.0.0.1", 5672) as proxy:
        url = proxy.url(amqp_url)   # the same URL, through the proxy
        proxy.refuse()              # new connections are refused (nothing listens)
        proxy.reset()               # every open connection is cut with a TCP RST
        proxy.blackhole()           # connections stay up, bytes vanish both ways
        proxy.passthrough()         # back to normal (listening again on the same port)

One thread runs a selector loop over every socket; the control methods hand their work to
that thread and return once it is done, so that after ``reset()`` returns the connections
are gone, and after ``blackhole()`` returns no further byte is forwarded. ``refuse()``
affects new connections only: call ``reset()`` too to cut the open ones.
"""

from __future__ import annotations

import contextlib
import enum
import selectors
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

_CHUNK = 65536
_HIGH_WATER = 1 << 20  # stop reading a side while this much waits to be written to the other


class Mode(enum.Enum):
    """How the proxy treats traffic."""

    PASS = "pass"
    BLACKHOLE = "blackhole"
    REFUSE = "refuse"


class _Pair:
    """A client connection and its upstream one; ``out[s]`` waits to be written to ``s``."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.peer = {client: upstream, upstream: client}
        self.out: dict[socket.socket, bytearray] = {client: bytearray(), upstream: bytearray()}


class Proxy:
    """A threaded TCP proxy on ``host`` (an ephemeral port) forwarding to the target."""

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = port
        self.accepted = 0
        self.errors: list[Exception] = []  # unexpected errors of the loop thread
        self._mode = Mode.PASS
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._pairs: dict[socket.socket, _Pair] = {}
        self._interest: dict[socket.socket, int] = {}
        self._calls: deque[tuple[Callable[[], None], threading.Event, list[BaseException]]]
        self._calls = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._loop, name="tcp-proxy", daemon=True)
        self._running = False

    # -- control, from any thread ------------------------------------------------------------

    def start(self) -> Proxy:
        """Listen and start forwarding."""
        self._listen()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._running = True
        self._thread.start()
        return self

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def mode(self) -> Mode:
        """The current mode."""
        return self._mode

    @property
    def connections(self) -> int:
        """How many client connections are open."""
        return len({id(pair) for pair in self._pairs.values()})

    def url(self, amqp_url: str) -> str:
        """``amqp_url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(amqp_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{self.host}:{self.port}" if userinfo else f"{self.host}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def passthrough(self) -> None:
        """Forward everything; listen again if refusing."""
        self._call(lambda: self._set_mode(Mode.PASS))

    def blackhole(self) -> None:
        """Keep connections (and accept new ones) but silently drop every byte both ways."""
        self._call(lambda: self._set_mode(Mode.BLACKHOLE))

    def refuse(self) -> None:
        """Stop listening: new connections are refused. Open ones are left as they are."""
        self._call(lambda: self._set_mode(Mode.REFUSE))

    def reset(self) -> None:
        """Cut every open connection, both sides, with a TCP RST."""
        self._call(self._reset_all)

    def close(self) -> None:
        """Stop the loop and close every socket."""
        if not self._running:
            return
        self._call(self._stop)
        self._thread.join(timeout=5)
        self._wake_r.close()
        self._wake_w.close()

    def _call(self, work: Callable[[], None]) -> None:
        if not self._running:
            raise RuntimeError("the proxy is not running")
        done, errors = threading.Event(), list[BaseException]()
        self._calls.append((work, done, errors))
        self._wake_w.send(b"\0")
        if not done.wait(timeout=5):
            raise TimeoutError("the proxy loop did not answer")
        if errors:
            raise errors[0]

    # -- the loop thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while self._running:
            for key, events in self._selector.select(timeout=1.0):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    self._dispatch(sock, events)
                except Exception as exc:  # a bug here must not stop the loop: keep it for tests
                    self.errors.append(exc)
                    if sock in self._pairs:
                        self._close_pair(sock, rst=True)
        for sock in list(self._pairs):
            if sock in self._pairs:  # its partner's closing took it too
                self._close_pair(sock, rst=False)
        self._unlisten()
        self._selector.close()

    def _dispatch(self, sock: socket.socket, events: int) -> None:
        if sock is self._wake_r:
            self._run_calls()
        elif sock is self._listener:
            self._accept()
        elif sock in self._pairs:
            self._transfer(sock, events)

    def _run_calls(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)
        while self._calls:
            work, done, errors = self._calls.popleft()
            try:
                work()
            except BaseException as exc:  # handed back to the caller
                errors.append(exc)
            done.set()

    def _set_mode(self, mode: Mode) -> None:
        self._mode = mode
        if mode is Mode.REFUSE:
            self._unlisten()
        elif self._listener is None:
            self._listen()
        if mode is Mode.BLACKHOLE:
            for pair in set(self._pairs.values()):
                for buffer in pair.out.values():
                    buffer.clear()

    def _stop(self) -> None:
        self._running = False

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ)

    def _unlisten(self) -> None:
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.accepted += 1
            self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=2.0)
        except OSError:
            _abort(client)  # the target is down: the client sees a reset
            return
        pair = _Pair(client, upstream)
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pairs[sock] = pair
            self._interest[sock] = selectors.EVENT_READ
            self._selector.register(sock, selectors.EVENT_READ)

    def _transfer(self, sock: socket.socket, events: int) -> None:
        pair = self._pairs[sock]
        try:
            if events & selectors.EVENT_READ and not self._read(sock, pair):
                self._close_pair(sock, rst=False)
                return
            if events & selectors.EVENT_WRITE and pair.out[sock]:
                sent = sock.send(pair.out[sock])
                del pair.out[sock][:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close_pair(sock, rst=True)  # pass a reset on as a reset
            return
        for end in pair.peer:
            self._update(end, pair)

    def _read(self, sock: socket.socket, pair: _Pair) -> bool:
        """Read what ``sock`` has; False on end of stream."""
        data = sock.recv(_CHUNK)
        if not data:
            return False
        if self._mode is not Mode.BLACKHOLE:
            pair.out[pair.peer[sock]] += data
        return True

    def _update(self, sock: socket.socket, pair: _Pair) -> None:
        events = selectors.EVENT_WRITE if pair.out[sock] else 0
        if len(pair.out[pair.peer[sock]]) < _HIGH_WATER:
            events |= selectors.EVENT_READ
        before = self._interest.get(sock, 0)
        if events == before:
            return
        if not before:
            self._selector.register(sock, events)
        elif not events:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, events)
        self._interest[sock] = events

    def _reset_all(self) -> None:
        for sock in list(self._pairs):
            if sock in self._pairs:
                self._close_pair(sock, rst=True)

    def _close_pair(self, sock: socket.socket, rst: bool) -> None:
        pair = self._pairs[sock]
        for end in pair.peer:
            self._pairs.pop(end, None)
            if self._interest.pop(end, 0):
                self._selector.unregister(end)
            if rst:
                _abort(end)
            else:
                _flush_and_close(end, pair.out[end])


def _abort(sock: socket.socket) -> None:
    """Close with RST: SO_LINGER on with a zero timeout discards the send buffer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _flush_and_close(sock: socket.socket, pending: bytearray) -> None:
    try:
        if pending:
            sock.setblocking(True)
            sock.settimeout(1.0)
            sock.sendall(pending)
    except OSError:
        pass
    sock.close()
