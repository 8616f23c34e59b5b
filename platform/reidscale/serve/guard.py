"""The ingress's ASGI guard: bearer token and body size, checked before FastAPI reads any body.

Plain ASGI (no FastAPI import): a request over the limit is refused from its
``content-length`` without reading it; a chunked body is read up to the limit and replayed,
so a client cannot stream past it. ``settings`` is the replica's plan, filled in its
``__init__`` after the middleware is built (keys ``token``, ``max_request_bytes``).
"""

from __future__ import annotations

import hmac
import json

# reachable without the bearer token: liveness probes and the API description
OPEN_PATHS = {"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}


async def send_json_error(send, status: int, message: str) -> None:
    """A ``{"detail": message}`` JSON response, FastAPI's error shape."""
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, settings: dict):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if not self._authorised(scope, headers):
            return await send_json_error(send, 401, "missing or wrong bearer token (Authorization: Bearer ...)")
        limit = self.settings.get("max_request_bytes", 32 << 20)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await send_json_error(send, 413, f"request body of {int(length)} bytes, over the {limit} byte "
                                                    "limit (max_request_mb)")
        body = await _read_body(receive, limit)
        if body is None:
            return await send_json_error(send, 413, f"request body over the {limit} byte limit (max_request_mb)")
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    def _authorised(self, scope, headers: dict) -> bool:
        token = self.settings.get("token", "")
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        if not token or path in OPEN_PATHS:
            return True
        return hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {token}".encode())


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes ``limit`` bytes."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
        if size > limit:
            return None
    return b"".join(chunks)
