"""``exitpipe web [--host H] [--port P]``: the read-only dashboard (``exitpipe.web``).

Binds to loopback (127.0.0.1:8080) by default. Binding anywhere else needs
``EXITPIPE_WEB_TOKEN``, and then every request must carry it. Stops cleanly on SIGTERM or
SIGINT and exits 0. Exit statuses: 0 stopped; 2 bad arguments, no token for a non-loopback
address, an address that cannot be bound, a store or policy that does not open.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import sys
from typing import Any

import uvicorn

from consumers.policy import PolicyError, load_policy
from consumers.store import StoreError
from consumers.store.factory import open_store, redact_url
from exitpipe.settings import Settings
from exitpipe.web.app import create_app
from exitpipe.web.sources import sources_from

EX_OK = 0
EX_USAGE = 2


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``web``."""
    web = subparsers.add_parser(
        "web", parents=[common], help="the read-only dashboard: jobs, one job, dead letters"
    )
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    web.add_argument("--port", type=int, default=8080, help="port to bind (default 8080)")
    web.add_argument(
        "--refresh",
        type=int,
        default=10,
        metavar="SECONDS",
        help="the jobs and health pages refresh themselves this often (0: never; default 10)",
    )
    web.set_defaults(func=serve)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; a name is not trusted to resolve there."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the dashboard until SIGTERM or SIGINT."""
    token = settings.web_token.get_secret_value() if settings.web_token else None
    if not token and not is_loopback(args.host):
        return _usage(
            f"--host {args.host}: only a loopback address may be bound without a token; "
            "set EXITPIPE_WEB_TOKEN (requests then need it) or bind 127.0.0.1"
        )
    if args.refresh < 0:
        return _usage("--refresh: must be 0 (never) or more seconds")
    try:
        policy = load_policy(settings.policy)
        store = open_store(settings.store)
    except (PolicyError, StoreError) as exc:
        return _usage(str(exc))
    try:
        try:
            sock = _bound(args.host, args.port)
        except (OSError, OverflowError) as exc:
            return _usage(f"--host {args.host} --port {args.port}: cannot bind: {exc}")
        app = create_app(sources_from(settings, store, policy), token=token, refresh=args.refresh)
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(
            f"exitpipe web: http://{shown}:{args.port}/ (store {redact_url(settings.store)}, "
            f"namespace {settings.namespace}{', token required' if token else ''})",
            file=sys.stderr,
            flush=True,
        )
        _run(app, sock)
    finally:
        store.close()
    return EX_OK


def _usage(message: str) -> int:
    print(f"exitpipe web: {message}", file=sys.stderr)
    return EX_USAGE


def _bound(host: str, port: int) -> socket.socket:
    """A listening socket of our own, so a bind error is ours to report (exit 2)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _run(app: Any, sock: socket.socket) -> None:
    # uvicorn re-raises the signal that stopped it once it has shut down; with these no-op
    # handlers in place that ends nothing, and the command exits 0 as the daemons do.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, server_header=False, lifespan="off"
    )
    uvicorn.Server(config).run(sockets=[sock])
