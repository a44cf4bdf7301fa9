"""The local durable outbox: one file per message the broker has not confirmed yet.

A file is named ``<time_ns>-<message id>.json`` so that names sort in arrival order, and is
written to a hidden temporary file, fsync'd, renamed into place, and the directory fsync'd:
after a crash at any point a message is either wholly in the spool or not at all. A
spooled message keeps its ``message_id`` (the event id) and its body byte for byte, so a late
delivery is the same event and downstream deduplication recognises it.

The body is stored as text when it is UTF-8 (events always are; it keeps the files readable)
and as base64 otherwise.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from producers.publisher import Outgoing

log = logging.getLogger(__name__)


def default_spool() -> Path:
    """``$XDG_STATE_HOME/exitpipe/spool`` (``~/.local/state/exitpipe/spool``)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "exitpipe" / "spool"


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class Spool:
    """A directory of messages waiting for the broker, oldest first."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def put(self, message: Outgoing) -> Path:
        """Store ``message`` durably; return its file."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        safe_id = _UNSAFE.sub("_", message.message_id)[:80]
        path = self.directory / f"{time.time_ns():020d}-{safe_id}.json"
        temp = self.directory / f".{path.name}.tmp"
        with open(temp, "wb") as file:
            file.write(json.dumps(_to_record(message)).encode())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
        self._sync_directory()
        return path

    def pending(self) -> list[tuple[Path, Outgoing]]:
        """Every spooled message, oldest first; unreadable files are left alone and logged."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("[!.]*.json")):
            message = _read(path)
            if message is not None:
                found.append((path, message))
        return found

    def count(self) -> int:
        """How many messages wait in the spool."""
        return len(list(self.directory.glob("[!.]*.json"))) if self.directory.is_dir() else 0

    def remove(self, path: Path) -> None:
        """Forget a message once the broker has confirmed it; a missing file is fine."""
        path.unlink(missing_ok=True)
        self._sync_directory()

    @contextmanager
    def flushing(self) -> Iterator[bool]:
        """Hold the spool's flush lock if no other process does; yield whether we got it.

        Two processes flushing the same spool would send every message twice; the loser of
        the lock sends only its own new messages. An unusable directory yields False.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:  # an unusable spool has nothing to flush; put() says why
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the lock

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _to_record(message: Outgoing) -> dict[str, Any]:
    record: dict[str, Any] = {
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "message_id": message.message_id,
        "content_type": message.content_type,
        "headers": dict(message.headers) if message.headers else None,
    }
    try:
        record["body"] = message.body.decode("utf-8")
    except UnicodeDecodeError:
        record["body_base64"] = base64.b64encode(message.body).decode("ascii")
    return record


def _from_record(record: dict[str, Any]) -> Outgoing:
    if "body" in record:
        body = str(record["body"]).encode("utf-8")
    else:
        body = base64.b64decode(record["body_base64"], validate=True)
    return Outgoing(
        exchange=str(record["exchange"]),
        routing_key=str(record["routing_key"]),
        body=body,
        message_id=str(record["message_id"]),
        content_type=record.get("content_type"),
        headers=record.get("headers"),
    )


def _read(path: Path) -> Outgoing | None:
    try:
        return _from_record(json.loads(path.read_bytes()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
        log.warning("spool file %s is unreadable, left in place: %s", path, exc)
        return None
