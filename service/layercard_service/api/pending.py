"""What an RPC answers before the capability behind it is built: UNIMPLEMENTED naming what is missing."""

from __future__ import annotations

from layercard_service.errors import Unimplemented

__all__ = ["not_built"]


def not_built(method: str, capability: str) -> Unimplemented:
    return Unimplemented(
        f"{method} is part of the contract but not built yet: {capability} is missing from this server",
        metadata={"method": method, "capability": capability},
    )
