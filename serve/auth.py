"""Optional API key: `Authorization: Bearer <key>` on HTTP, the same pair as gRPC metadata."""

from __future__ import annotations

import hmac
from collections.abc import Iterable


class ApiKeyCheck:
    """Accepts everything when no key is configured (None); otherwise exactly `Bearer <key>`. An empty key is
    refused rather than taken to mean "no key"."""

    def __init__(self, key: str | None) -> None:
        if key is not None and not key.strip():
            raise ValueError("the API key is empty; give a real key or None for no key")
        self.key = key

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def accepts(self, authorization: str | None) -> bool:
        if self.key is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key.encode())

    def accepts_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        values = [value for name, value in metadata or () if name.lower() == "authorization"]
        value = values[0] if values else None
        return self.accepts(value.decode() if isinstance(value, bytes) else value)
