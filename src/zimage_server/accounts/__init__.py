"""Who may call, and how fast: API keys, scopes and per-key rate limits."""

from zimage_server.accounts.access import AccessControl
from zimage_server.accounts.keys import KeyInfo, KeyService, Principal
from zimage_server.accounts.limits import Admission, RateLimiter

__all__ = ["AccessControl", "Admission", "KeyInfo", "KeyService", "Principal", "RateLimiter"]
