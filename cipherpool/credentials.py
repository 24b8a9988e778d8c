"""Bearer credentials: account API keys and access tokens.

Both are 32 random bytes, shown once, stored only as SHA-256. The prefix says what a string is
so that a key pasted where a token belongs gets a clear error rather than a lookup miss.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

API_KEY_PREFIX = "cpk_"
TOKEN_PREFIX = "cpt_"
DISPLAY_CHARS = 10  # leading characters kept in clear for listings


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def same_digest(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)
