"""Replacement policies, one per module, registered by name."""

from __future__ import annotations

from memlend.policies.base import Policy

# name -> class; filled by the policy modules below.
POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, capacity: int) -> Policy:
    """Build policy `name` with `capacity` resident keys; ValueError if unknown."""
    try:
        cls = POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"unknown policy {name!r} (known: {known})") from None
    return cls(capacity)


# Import for their registration side effect.
from memlend.policies import lru  # noqa: E402,F401
from memlend.policies import arc, lirs, s3fifo, sieve, twoq  # noqa: E402,F401
