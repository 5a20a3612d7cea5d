"""Bearer authentication: API keys (constant-time compare) or HS256 JWTs.

With no keys and no JWT secret configured, the server is open and every caller is `anonymous`.
The caller's identity scopes what they own (sessions, predictions); keys themselves are never
stored or logged, only a hash-derived identity.
"""

from __future__ import annotations

import hashlib
import hmac

import jwt
from fastapi import Request

from engine.errors import EmberError


class Unauthorized(EmberError):
    status = 401
    code = "invalid_api_key"


ANONYMOUS = "anonymous"


def identity_of_key(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Authenticator:
    def __init__(self, api_keys: list[str], jwt_secret: str | None = None):
        self.key_digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self.jwt_secret = jwt_secret

    @property
    def enabled(self) -> bool:
        return bool(self.key_digests or self.jwt_secret)

    def check(self, token: str | None, extra_keys: tuple[str, ...] = ()) -> str:
        """The identity for a bearer token, or Unauthorized."""
        if not self.enabled and not extra_keys:
            return ANONYMOUS
        if not token:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        digest = hashlib.sha256(token.encode()).digest()
        candidates = self.key_digests + [hashlib.sha256(k.encode()).digest() for k in extra_keys]
        matched = False
        for known in candidates:  # compare against every key so timing says nothing
            matched |= hmac.compare_digest(digest, known)
        if matched:
            return identity_of_key(token)
        if self.jwt_secret and token.count(".") == 2:
            try:
                claims = jwt.decode(token, self.jwt_secret, algorithms=["HS256"],
                                    options={"require": ["sub"]})
                return "jwt:" + str(claims["sub"])
            except jwt.PyJWTError as exc:
                raise Unauthorized(f"Invalid token: {exc}") from None
        raise Unauthorized("Invalid API key.")


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() in ("bearer", "token") and token.strip():
        return token.strip()
    return None


def require_identity(request: Request) -> str:
    """FastAPI dependency: the caller's identity (raises 401 in the route's dialect)."""
    return request.app.state.auth.check(bearer_token(request))
