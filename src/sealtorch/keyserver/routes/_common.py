"""Helpers shared by the route modules."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel

from sealtorch.keyserver.runtime import Runtime
from sealtorch.keyserver.service import ErrorKind, ServiceError

__all__ = ["Runtime", "bearer_token", "client_address", "json_response", "runtime"]


def runtime(request: Request) -> Runtime:
    value: Runtime = request.app.state.runtime
    return value


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    """Serialise a wire model directly (no re-validation of what we built ourselves)."""
    return Response(
        content=model.model_dump_json(),
        status_code=status_code,
        media_type="application/json",
    )


def bearer_token(credentials: HTTPAuthorizationCredentials | None, what: str) -> str:
    """The presented bearer token; a missing one is ``401`` (a wrong one is ``403`` later)."""
    if credentials is None or not credentials.credentials:
        raise ServiceError(
            ErrorKind.UNAUTHENTICATED,
            "unauthenticated",
            f"this endpoint needs a {what} (Authorization: Bearer ...)",
        )
    return credentials.credentials
