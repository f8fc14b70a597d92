"""API keys: who may score, who may administer, and the middleware that checks them.

Keys are named (the name, never the key, goes to the logs). Every comparison runs in constant
time and against every key, so timing says nothing about which key was close. `/healthz` and
`/readyz` are always open; `/metrics` needs a key only when asked to. The watch page (`/watch`)
shows what is being scored, so it is an admin's: with keys set it needs the admin key, which a
browser may send as the password of HTTP Basic authentication (it asks for it once); without any
key (a loopback server) it is open.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_response
from server.logs import caller

log = logging.getLogger(__name__)

OPEN_PATHS = ("/healthz", "/readyz")
DOC_PATHS = ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")
WATCH_PATHS = ("/watch", "/watch/data")
WATCH_REALM = 'Basic realm="FIRM watch", charset="UTF-8"'


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_keys(text: str, origin: str) -> dict[str, str]:
    """Named keys from 'name:key' entries separated by commas or new lines ('#' starts a comment)."""
    keys: dict[str, str] = {}
    entries = [e.strip() for line in text.splitlines() for e in line.split("#", 1)[0].split(",")]
    for number, entry in enumerate((e for e in entries if e), start=1):
        name, sep, key = entry.partition(":")
        if not sep or not name.strip() or not key.strip():
            raise ValueError(f"{origin}: entry {number} is not 'name:key'")
        if len(key.strip()) < 16:
            raise ValueError(f"{origin}: key '{name.strip()}' is shorter than 16 characters")
        keys[name.strip()] = key.strip()
    return keys


def load_keys(inline: str | None, key_file: Path | None) -> dict[str, str]:
    keys: dict[str, str] = {}
    if key_file is not None:
        keys.update(parse_keys(key_file.read_text(encoding="utf-8"), str(key_file)))
    if inline:
        keys.update(parse_keys(inline, "FIRM_API_KEYS"))
    return keys


@dataclass(frozen=True)
class KeyRing:
    scoring: Mapping[str, str]  # name -> key
    admin: str | None = None
    protect_metrics: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.scoring)

    def match(self, given: str, keys: Iterable[tuple[str, str]]) -> str | None:
        """The name of the key equal to `given`, comparing against all of them in constant time."""
        found = None
        for name, key in keys:
            if hmac.compare_digest(given.encode(), key.encode()):
                found = name
        return found

    def identify(self, given: str) -> tuple[str | None, bool]:
        """(scoring key name, is the admin key)."""
        name = self.match(given, self.scoring.items())
        is_admin = self.admin is not None and self.match(given, [("admin", self.admin)]) is not None
        return name, is_admin


def _bearer(scope: Scope) -> str | None:
    for header, value in scope["headers"]:
        if header == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _basic_password(scope: Scope) -> str | None:
    """The password of HTTP Basic credentials (the user name is not read): how a browser sends a key."""
    for header, value in scope["headers"]:
        if header == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() != "basic":
                return None
            try:
                decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return None
            return decoded.partition(":")[2] or None
    return None


class Authentication:
    """401 without a valid key, 403 with a key of the wrong scope, 404 for admin routes without an admin key."""

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        refusal = self._refusal(path, _bearer(scope), scope)
        if refusal is None:
            token = caller.set(scope.get("state", {}).get("key_name"))  # log lines name the key, never show it
            try:
                await self.app(scope, receive, send)
            finally:
                caller.reset(token)
            return
        status, code, message = refusal
        challenge = WATCH_REALM if path in WATCH_PATHS else "Bearer"
        headers = {"WWW-Authenticate": challenge} if status == 401 else None
        response = error_response(status, code, message)
        if headers:
            response.headers.update(headers)
        await response(scope, receive, send)

    def _refusal(self, path: str, token: str | None, scope: Scope) -> tuple[int, str, str] | None:
        if path in OPEN_PATHS or (path in DOC_PATHS and not self.keys.enabled):
            return None
        if path in WATCH_PATHS:
            return self._watch_refusal(token or _basic_password(scope), scope)
        if path.startswith("/v1/admin/"):
            if self.keys.admin is None:
                return 404, "admin_off", "admin routes are off on this server; start it with --admin-key to use them"
            return self._admin_refusal(token, "admin routes need 'Authorization: Bearer <admin key>'", "administer")
        if path == "/metrics" and not self.keys.protect_metrics:
            return None
        if not self.keys.enabled:
            return None
        if token is None:
            return 401, "unauthorized", "this server needs 'Authorization: Bearer <API key>'"
        name, is_admin = self.keys.identify(token)
        if name is None and not is_admin:
            return 401, "unauthorized", "unknown key"
        scope.setdefault("state", {})["key_name"] = name or "admin"
        return None

    def _watch_refusal(self, token: str | None, scope: Scope) -> tuple[int, str, str] | None:
        """The watch page: without keys, open to this machine alone (it shows callers' images and texts, and a
        server bound wide with --insecure must not show them to the network); else the admin key's."""
        if self.keys.admin is None:
            if not self.keys.enabled:
                client = (scope.get("client") or ("", 0))[0]
                if is_loopback(client):
                    return None
                return 403, "forbidden", "without keys the watch page is shown on this machine only; set --admin-key"
            return 404, "admin_off", "the watch page needs the admin key; start the server with --admin-key"
        missing = "the watch page needs the admin key (as a Bearer token or a Basic password)"
        return self._admin_refusal(token, missing, "watch")

    def _admin_refusal(self, token: str | None, missing: str, verb: str) -> tuple[int, str, str] | None:
        """A route for the admin key alone: 401 without a key (`missing` says how to send it) or with an unknown
        one, 403 with a scoring key, which may score but not `verb`."""
        if token is None:
            return 401, "unauthorized", missing
        name, is_admin = self.keys.identify(token)
        if is_admin:
            return None
        return (
            (403, "forbidden", f"this key may score but not {verb}") if name else (401, "unauthorized", "unknown key")
        )
