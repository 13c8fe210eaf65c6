"""Bearer API keys mapped to tenants (OTFUSE_API_KEYS). With none configured (the embedded
default, loopback only) every caller is the tenant `local`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .problems import ProblemError

LOCAL_TENANT = "local"
bearer = HTTPBearer(auto_error=False, description="an API key from OTFUSE_API_KEYS")


async def tenant(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    settings = request.app.state.settings
    if not settings.api_keys:
        return LOCAL_TENANT
    challenge = {"WWW-Authenticate": 'Bearer realm="otfuse"'}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ProblemError(401, "a bearer API key is required", headers=challenge)
    found = settings.tenant_for(credentials.credentials)
    if found is None:
        raise ProblemError(401, "unknown API key", headers=challenge)
    return found
