"""Who may call the server. One ASGI gate in front of every route: with `--api-auth` the API, its docs and its
schema need HTTP Basic credentials; with `--gradio-auth` every UI route needs the session the UI's login page
gives, except that page and its static assets. Gradio checks the login on most of its routes itself, but not on all
(its stream, reset, cancel and run-history routes, among others); the gate covers whatever a Gradio version adds."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Callable
from http.cookies import SimpleCookie

# Paths of the API side: guarded by --api-auth.
API_PREFIXES = ("/sdapi/", "/docs", "/redoc", "/openapi.json")
# What the UI's login page itself loads; everything else of the UI needs a session.
LOGIN_PAGE = ("/", "/login", "/login/", "/theme.css", "/gradio_api/theme.css", "/favicon.ico", "/robots.txt")
LOGIN_PAGE_PREFIXES = ("/assets/", "/static/", "/svelte/")


def credentials_match(header: str | None, allowed: list[tuple[str, str]]) -> bool:
    """True when an `Authorization: Basic ...` header names one of the allowed user/password pairs."""
    if not header or header[:6].lower() != "basic ":
        return False
    try:
        user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    if not sep:
        return False
    found = False
    for good_user, good_password in allowed:
        # Compare against every pair, in constant time, so timing does not tell which user exists.
        same = secrets.compare_digest(user.encode(), good_user.encode())
        same &= secrets.compare_digest(password.encode(), good_password.encode())
        found |= same
    return found


def is_api_path(path: str) -> bool:
    return path.startswith(API_PREFIXES)


def is_login_page(path: str) -> bool:
    return path in LOGIN_PAGE or path.startswith(LOGIN_PAGE_PREFIXES)


class AccessGate:
    """ASGI middleware. `ui_user(cookies)` names the logged-in UI user or None; None for the callable itself means
    the UI has no login (no `--gradio-auth`)."""

    def __init__(
        self,
        app,
        api_credentials: list[tuple[str, str]],
        ui_user: Callable[[dict[str, str]], str | None] | None,
    ):
        self.app = app
        self.api_credentials = api_credentials
        self.ui_user = ui_user

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._refusal(path, headers)
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            status, message, extra = refusal
            body = json.dumps({"detail": message}).encode()
            response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            response_headers += [(k.encode(), v.encode()) for k, v in extra.items()]
            await send({"type": "http.response.start", "status": status, "headers": response_headers})
            await send({"type": "http.response.body", "body": body})

    def _refusal(self, path: str, headers: dict[str, str]) -> tuple[int, str, dict[str, str]] | None:
        if is_api_path(path):
            if self.api_credentials and not credentials_match(headers.get("authorization"), self.api_credentials):
                return 401, "Incorrect username or password", {"WWW-Authenticate": "Basic"}
            return None
        if self.ui_user is None or is_login_page(path):
            return None
        cookies = SimpleCookie()
        try:
            cookies.load(headers.get("cookie", ""))
        except Exception:  # a malformed cookie header is simply no session
            cookies = SimpleCookie()
        if self.ui_user({k: m.value for k, m in cookies.items()}) is None:
            return 401, "Not logged in: open the UI's address and log in first.", {}
        return None


def gradio_session_user(gradio_app) -> Callable[[dict[str, str]], str | None]:
    """The logged-in user of a request's cookies, as Gradio's own login check reads them (its access-token
    cookie, secure or not, looked up in the tokens its /login handed out)."""

    def user(cookies: dict[str, str]) -> str | None:
        cookie_id = gradio_app.cookie_id
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        return gradio_app.tokens.get(token) if token else None

    return user
