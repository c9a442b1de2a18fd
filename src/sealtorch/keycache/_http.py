"""The key cache's HTTP server: the shared one of :mod:`sealtorch._http_fast` (the key server
answers its release requests with it too)."""

from __future__ import annotations

from sealtorch._http_fast import Handler, HttpServer, Refusal, Request, Response

__all__ = ["Handler", "HttpServer", "Refusal", "Request", "Response"]
