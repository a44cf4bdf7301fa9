"""pika connection parameters that verify the broker for ``amqps://`` URLs.

pika builds a default TLS context for ``amqps://`` but gives it no server name, so with
hostname checking on (as it must be) the handshake fails before it starts; and it has no
place for a private CA. Both adapters build their parameters here.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pika


def connection_parameters(url: str, ca_file: Path | None, heartbeat: int) -> pika.URLParameters:
    """Parameters for ``url``; for ``amqps://`` a verifying TLS context, trusting ``ca_file``.

    Without ``ca_file`` the system's trust store verifies the broker. For ``amqp://`` there
    is no TLS and ``ca_file`` is not used.
    """
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat
    if params.ssl_options is None:
        return params
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    params.ssl_options = pika.SSLOptions(context, server_hostname=params.host)
    return params
