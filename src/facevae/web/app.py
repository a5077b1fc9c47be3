"""The HTTP side of the page (Starlette): routes, body limits, JSON errors. The model work is in studio.py.

    GET  /                         the page;  GET /static/NAME: its packaged files, nothing else
    GET  /api/info                 the run: config, eval numbers, attribute names, number of principal directions
    GET  /api/sample?seed=S&temperature=T[&format=json]     a PNG (or {"latent": [...]})
    POST /api/encode               multipart field `image` -> {"latent": [...]}, the posterior mean
    POST /api/decode               {"latent": [...], "edits": {id: amount}} -> PNG of the likelihood's mean
    POST /api/interpolate          {"a": face, "b": face, "steps": 8, "mode": "slerp"} -> PNG strip
    GET  /api/directions           attribute vectors and principal directions (standard-deviation units)
Errors are JSON {"error": "..."} with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from facevae.web.studio import BadRequest, Studio

STATIC_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".js": "text/javascript; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
MULTIPART_SLACK = 64 * 1024  # the multipart envelope around an upload: boundaries and part headers
HEADERS = {  # the page loads nothing from elsewhere, and the browser is told to enforce it
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files shipped in the package: name -> (bytes, content type). Only these are ever served."""
    folder = resources.files("facevae.web") / "static"
    return {f.name: (f.read_bytes(), STATIC_TYPES[f.name[f.name.rfind("."):]])
            for f in folder.iterdir() if f.is_file() and f.name[f.name.rfind("."):] in STATIC_TYPES}


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})


class Api:
    """The endpoints, on one Studio; model and image work runs in a small thread pool (bounded concurrency)."""

    def __init__(self, studio: Studio):
        self.studio = studio
        self.limits = studio.limits
        self.pool = ThreadPoolExecutor(max_workers=self.limits.workers, thread_name_prefix="facevae-web")
        self.files = static_files()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in the pool, so that the event loop keeps answering while the model works."""
        return await asyncio.wrap_future(self.pool.submit(fn, *args))

    async def page(self, request: Request) -> Response:
        return self._file("index.html")

    async def static(self, request: Request) -> Response:
        return self._file(request.path_params["name"])

    def _file(self, name: str) -> Response:
        if name not in self.files:  # a lookup in a table, never a path on disk: no traversal possible
            return error(f"no such file: {name}", 404)
        data, media_type = self.files[name]
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-cache"})

    async def info(self, request: Request) -> Response:
        return JSONResponse(self.studio.info())

    async def directions(self, request: Request) -> Response:
        return JSONResponse(self.studio.directions_json())

    async def sample(self, request: Request) -> Response:
        q = request.query_params
        seed = _number(q.get("seed", "0"), int, "seed")
        temperature = _number(q.get("temperature", "1"), float, "temperature")
        fmt = q.get("format", "png")
        if fmt not in ("png", "json"):
            raise BadRequest(f"format must be png or json, got {fmt!r}")
        z = self.studio.sample_latent(seed, temperature)
        if fmt == "json":
            return JSONResponse({"latent": z.tolist(), "seed": seed, "temperature": temperature})
        return png(await self.run(self.studio.png, z))

    async def encode(self, request: Request) -> Response:
        limit = self.limits.max_upload_bytes
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise BadRequest("send the photo as multipart/form-data, in the field 'image'")
        async with limited(request, limit + MULTIPART_SLACK).form(max_files=1, max_fields=4) as form:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise BadRequest("no file in the multipart field 'image'")
            data = await upload.read(limit + 1)
        if len(data) > limit:
            raise BadRequest(f"the upload is over the limit of {limit:,} bytes", 413)
        z = await self.run(self.studio.encode, data)
        return JSONResponse({"latent": z.tolist()})

    async def decode(self, request: Request) -> Response:
        z = self.studio.face(await self._json(request))
        return png(await self.run(self.studio.png, z))

    async def interpolate(self, request: Request) -> Response:
        body = await self._json(request)
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object {\"a\": face, \"b\": face, \"steps\": N, \"mode\": M}")
        a, b = self.studio.face(body.get("a"), "a"), self.studio.face(body.get("b"), "b")
        steps = body.get("steps", 8)
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise BadRequest("steps must be a whole number")
        path = self.studio.path(a, b, steps=steps, mode=body.get("mode", "slerp"))
        return png(await self.run(self.studio.png, path))

    async def _json(self, request: Request) -> Any:
        body = await limited(request, self.limits.max_json_bytes).body()
        try:
            return json.loads(body)
        except ValueError:  # UnicodeDecodeError included
            raise BadRequest("the body must be JSON") from None


def _number(text: str, kind: type, name: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise BadRequest(f"{name} must be a {'whole number' if kind is int else 'number'}, got {text!r}") from None


def limited(request: Request, limit: int) -> Request:
    """The request, its body refused with 413 past `limit` bytes: at once when Content-Length says so, else as
    soon as the bytes received pass it (a chunked upload is counted while it streams, never read whole first)."""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise BadRequest("the Content-Length header is not a number")
    if declared is not None and int(declared) > limit:
        raise BadRequest(f"the request body is {int(declared):,} bytes, over the limit of {limit:,}", 413)
    seen = 0

    async def receive() -> Message:
        nonlocal seen
        message = await request.receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BadRequest(f"the request body is over the limit of {limit:,} bytes", 413)
        return message

    return Request(request.scope, receive)


class Guard:
    """ASGI middleware: the page's security headers on every answer, and, when serving on the loopback, only
    requests addressed to a loopback name (a web page elsewhere cannot reach the server by DNS rebinding)."""

    def __init__(self, app: ASGIApp, *, allowed_hosts: tuple[str, ...] | None):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
        name = host[:host.index("]") + 1] if host.startswith("[") and "]" in host else host.split(":")[0]
        if self.allowed_hosts is not None and name not in self.allowed_hosts:
            return await error(f"this server answers only requests to {', '.join(self.allowed_hosts)}",
                               400)(scope, receive, send)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      *((k.lower().encode(), v.encode()) for k, v in HEADERS.items())]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(studio: Studio, *, allowed_hosts: tuple[str, ...] | None = LOOPBACK_NAMES) -> ASGIApp:
    """The page and its API on a loaded run; `allowed_hosts` None answers requests to any host name."""
    api = Api(studio)
    routes = [Route("/", api.page), Route("/static/{name}", api.static), Route("/api/info", api.info),
              Route("/api/directions", api.directions), Route("/api/sample", api.sample),
              Route("/api/encode", api.encode, methods=["POST"]), Route("/api/decode", api.decode, methods=["POST"]),
              Route("/api/interpolate", api.interpolate, methods=["POST"])]

    async def bad_request(request: Request, exc: Exception) -> Response:
        return error(exc.message, exc.status)  # type: ignore[attr-defined]

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        detail = "not found: " + request.url.path if status == 404 else getattr(exc, "detail", "error")
        return error(detail, status)

    async def server_error(request: Request, exc: Exception) -> Response:
        return error(f"internal error ({type(exc).__name__}); the server's log has the details", 500)

    app = Starlette(routes=routes, exception_handlers={BadRequest: bad_request, HTTPException: http_error,
                                                       Exception: server_error})
    return Guard(app, allowed_hosts=allowed_hosts)
