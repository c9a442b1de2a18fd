"""The error every server raises when it cannot listen on an address.

The key server, the key cache and the inference server each bind their own sockets; they word
the failure the same way through :func:`listen_error`, and a port that is already taken also
says how to get a free one (each server's option for port 0).
"""

from __future__ import annotations

import errno

from sealtorch.errors import ConfigError

__all__ = ["listen_error"]


def listen_error(where: str, exc: OSError, *, free_port: str | None = None) -> ConfigError:
    """``cannot listen on WHERE: REASON``, with what to do when the address is in use.

    ``free_port`` is how to ask this server for a free port (e.g. ``--port 0``); ``None`` for a
    Unix socket.
    """
    message = f"cannot listen on {where}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        message += "; another process is listening there: stop it or choose another "
        message += f"port ({free_port} picks a free one and prints it)" if free_port else "address"
    return ConfigError(message)
