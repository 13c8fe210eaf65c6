"""RFC 9457 problem details (`application/problem+json`) for every error the API returns."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

PROBLEM = "application/problem+json"
TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
}


class ProblemError(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        errors: list[dict] | None = None,
        headers: dict | None = None,
    ):
        super().__init__(detail)
        self.status, self.detail, self.kind = status, detail, kind
        self.errors, self.headers = errors, headers


class SpecError(ProblemError):
    """A job spec field is invalid; `field` is its dotted JSON path."""

    def __init__(self, field: str, message: str):
        super().__init__(
            422,
            f"{field}: {message}",
            kind="invalid-job-spec",
            errors=[{"field": field, "message": message}],
        )
        self.field = field


def problem(
    status: int,
    detail: str | None,
    instance: str | None = None,
    kind: str | None = None,
    errors: list[dict] | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    body = {
        "type": f"urn:otfuse:problem:{kind}" if kind else "about:blank",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _field(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "header", "path")]
    return ".".join(parts) or "body"


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """The methods some route fully matches for this path (the router's own 405 names only
    the first route that matched the path)."""
    allowed = []
    for method in METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            allowed.append(method)
    return allowed


def install(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError):
        return problem(exc.status, exc.detail, request.url.path, exc.kind, exc.errors, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = []
        for err in exc.errors():
            loc = list(err.get("loc", ()))
            if err.get("type") == "extra_forbidden":
                message = "unknown field"
            elif err.get("type") == "json_invalid":
                message = f"invalid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
            elif err.get("type") == "value_error" and "error" in err.get("ctx", {}):
                message = str(err["ctx"]["error"])  # our validators' words, unprefixed
            else:
                message = err.get("msg", "invalid")
            errors.append({"field": _field(loc), "message": message})
        first = errors[0] if errors else {"field": "body", "message": "invalid"}
        kind = "invalid-job-spec" if request.method == "POST" else "invalid-request"
        return problem(422, f"{first['field']}: {first['message']}", request.url.path, kind, errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        if exc.status_code == 400 and request.method == "POST":  # a body that is not JSON
            message = "not a JSON document (invalid bytes or syntax)"
            errors = [{"field": "body", "message": message}]
            return problem(
                422, f"body: {message}", request.url.path, "invalid-job-spec", errors, headers
            )
        if exc.status_code == 405:  # every route of the path, not only the first one matched
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(app, request))}
        return problem(
            exc.status_code,
            exc.detail if isinstance(exc.detail, str) else None,
            request.url.path,
            headers=headers,
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return problem(500, "internal error; see the server log", request.url.path)
