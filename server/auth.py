"""Bearer authentication: API keys (constant-time compare) or HS256 JWTs.

With no keys and no JWT secret configured, the server is open and every caller is `anonymous`.
The caller's identity scopes what they own (sessions, predictions); keys themselves are never
stored or logged, only a hash-derived identity.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

import jwt
from fastapi import Request

from engine.errors import EmberError


class Unauthorized(EmberError):
    status = 401
    code = "invalid_api_key"


ANONYMOUS = "anonymous"


def identity_of_key(key: str) -> str:
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class JWTPolicy:
    """What an HS256 token must carry: `exp` no further than `max_lifetime_s` from its `iat` (or
    from now, without one), a non-empty `sub`, and the configured `aud`/`iss` when set."""

    max_lifetime_s: int = 24 * 3600
    audience: str | None = None
    issuer: str | None = None


class Authenticator:
    def __init__(self, api_keys: list[str], jwt_secret: str | None = None, jwt_policy: JWTPolicy | None = None):
        self.key_digests = [hashlib.sha256(k.encode()).digest() for k in api_keys]
        self.jwt_secret = jwt_secret
        self.jwt_policy = jwt_policy or JWTPolicy()

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
            return "jwt:" + self._jwt_subject(token)
        raise Unauthorized("Invalid API key.")

    def _jwt_subject(self, token: str) -> str:
        policy = self.jwt_policy
        required = ["sub", "exp"] + (["aud"] if policy.audience else []) + (["iss"] if policy.issuer else [])
        try:
            claims = jwt.decode(token, self.jwt_secret, algorithms=["HS256"], audience=policy.audience,
                                issuer=policy.issuer, options={"require": required})
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"Invalid token: {exc}") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject.strip():
            raise Unauthorized("Invalid token: 'sub' must be a non-empty string.")
        issued = claims.get("iat")
        start = issued if isinstance(issued, (int, float)) else time.time()
        if claims["exp"] - start > policy.max_lifetime_s:
            raise Unauthorized(f"Invalid token: it lives longer than this server's {policy.max_lifetime_s} s limit.")
        return subject


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() in ("bearer", "token") and token.strip():
        return token.strip()
    return None


def is_authorized(request: Request) -> bool:
    """Whether the caller presents a valid credential (always true on an open server)."""
    try:
        request.app.state.auth.check(bearer_token(request))
        return True
    except Unauthorized:
        return False


def identity_of(request: Request) -> str:
    """The caller's identity (raises 401 in the route's dialect)."""
    return request.app.state.auth.check(bearer_token(request))


async def require_identity(request: Request) -> str:
    """FastAPI dependency: `identity_of`, run on the event loop. A plain-function dependency runs
    in a worker thread, a thread hop per request for a check that takes microseconds."""
    return identity_of(request)
