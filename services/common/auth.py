"""Who is calling: API keys are owned by intake; other services ask it over RPC and remember the
answer for a minute (a revoked key stops working within that minute)."""

import time

from services.common.http import Forbidden, Unauthorized


class KeyCache:
    def __init__(self, ttl: float = 60):
        self.ttl, self.entries = ttl, {}

    def get(self, key):
        hit = self.entries.get(key)
        return hit[1] if hit and hit[0] > time.monotonic() else None

    def put(self, key, actor):
        if len(self.entries) > 10_000:
            self.entries.clear()
        self.entries[key] = (time.monotonic() + self.ttl, actor)


def request_key(request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("X-Api-Key")


def actor_for(request, cache: KeyCache, authenticate) -> dict:
    """``{"role", "subject"}`` of the request's key; 401 without a valid one."""
    key = request_key(request)
    if not key:
        raise Unauthorized("an API key is required: Authorization: Bearer KEY")
    return actor_for_key(key, cache, authenticate)


def actor_for_key(key: str, cache: KeyCache, authenticate) -> dict:
    """``{"role", "subject"}`` of an API key however it came (a header, the board's cookie)."""
    actor = cache.get(key)
    if actor is None:
        actor = authenticate(key)
        if actor is None:
            raise Unauthorized("unknown or revoked API key")
        cache.put(key, actor)
    return actor


def require_staff(actor: dict, what: str):
    if actor["role"] != "staff":
        raise Forbidden(f"{what} is for committee staff")


def require_role(actor: dict, roles: tuple, what: str):
    """403 unless the key's role is one of ``roles`` (a source key on the department API, ...)."""
    if actor["role"] not in roles:
        raise Forbidden(f"{what} is for {' and '.join(roles)} keys, not {actor['role']} keys")
