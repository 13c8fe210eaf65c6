"""Request bounds enforced before routing, parsing or authentication: a body larger than
`OTFUSE_MAX_BODY_BYTES` is answered 413 without the app seeing it."""

from __future__ import annotations

import json

from .problems import PROBLEM, TITLES

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BodyLimit:
    """Pure ASGI. A declared Content-Length over the limit is refused at once; otherwise the
    body is read (at most the limit, in the chunks the server hands over) and replayed to
    the app, so a lying or chunked sender is cut off at the limit too."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(scope, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, send) -> None:
        detail = f"the request body is larger than {self.max_bytes} bytes"
        body = json.dumps(
            {
                "type": "urn:otfuse:problem:body-too-large",
                "title": TITLES[413],
                "status": 413,
                "detail": detail,
                "instance": scope["path"],
            }
        ).encode()
        headers = [
            (b"content-type", PROBLEM.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
