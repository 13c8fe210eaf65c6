"""A FastAPI route for the polling hot path: documented from its signature like any route,
but served without dependency solving, parameter validation or response-model handling,
which were most of a poll's cost next to the bare FastAPI + Redis floor."""

from __future__ import annotations

from fastapi import Request
from fastapi.routing import APIRoute


class DirectRoute(APIRoute):
    """The endpoint is called as `endpoint(request, **path_params)` (path parameters as
    strings) and must return a Response; it reads headers and auth itself. Exceptions go to
    the app's handlers as usual (problem details)."""

    def get_route_handler(self):
        endpoint = self.endpoint

        async def handler(request: Request):
            return await endpoint(request, **request.path_params)

        return handler
