"""Bearer API keys mapped to tenants (OTFUSE_API_KEYS). With none configured (the embedded
default, loopback only) every caller is the tenant `local`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .problems import ProblemError

LOCAL_TENANT = "local"
bearer = HTTPBearer(auto_error=False, description="an API key from OTFUSE_API_KEYS")


CHALLENGE = {"WWW-Authenticate": 'Bearer realm="otfuse"'}


def tenant_of(request: Request) -> str:
    """The caller's tenant from the Authorization header (401 when missing or unknown).
    Plain function: the hot polling route calls it without dependency injection."""
    settings = request.app.state.settings
    if not settings.api_keys:
        return LOCAL_TENANT
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ProblemError(401, "a bearer API key is required", headers=CHALLENGE)
    found = settings.tenant_for(key.strip())
    if found is None:
        raise ProblemError(401, "unknown API key", headers=CHALLENGE)
    return found


async def tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    return tenant_of(request)
