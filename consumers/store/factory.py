"""Open a store from its URL (``EXITPIPE_STORE``, ``--store``).

``sqlite:///relative.db`` and ``sqlite:////absolute/path.db`` follow SQLAlchemy's form;
``memory://`` is a fresh in-memory store; ``postgresql://`` and ``postgres://`` are libpq
URLs. Adapters are imported on use, so a SQLite user never loads psycopg.
"""

from __future__ import annotations

from consumers.store import Store, StoreError
from consumers.store._shared import Clock, redact_url, utc_now

__all__ = ["SCHEMES", "open_store", "redact_url"]

SCHEMES = ("sqlite:///", "memory://", "postgresql://", "postgres://")


def open_store(url: str, clock: Clock = utc_now) -> Store:
    """The store ``url`` names; StoreError (password hidden) for any other URL."""
    if url.startswith("sqlite:///"):
        return _sqlite(url, clock)
    if url == "memory://":
        from consumers.store.memory import MemoryStore

        return MemoryStore(clock=clock)
    if url.startswith(("postgresql://", "postgres://")):
        from consumers.store.postgres import PostgresStore

        return PostgresStore(url, clock=clock)
    raise StoreError(
        f"unsupported store URL {redact_url(url)!r}: use sqlite:///relative.db, "
        "sqlite:////absolute/path.db, memory:// or postgresql://user@host/db"
    )


def _sqlite(url: str, clock: Clock) -> Store:
    from consumers.store.sqlite import SqliteStore

    path = url.removeprefix("sqlite:///")
    if not path or "?" in path:
        raise StoreError(
            f"bad SQLite URL {redact_url(url)!r}: give a file, sqlite:///relative.db or "
            "sqlite:////absolute/path.db (no query options)"
        )
    return SqliteStore(path, clock=clock)
