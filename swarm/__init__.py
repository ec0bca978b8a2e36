"""swarm: fault-tolerant decentralized training over the internet.

The public face: `DiLoCo` (the training hooks), `OuterConfig`, `SwarmPeer` (a peer of a
swarm run, for the hooks), `LocalGroup` (in-process members for experiments), and
`CoordinatorConfig`. Everything else lives in named submodules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from swarm.coordinator.config import CoordinatorConfig

__version__ = "0.1.0"

__all__ = ["CoordinatorConfig", "DiLoCo", "LocalGroup", "OuterConfig", "SwarmPeer", "__version__"]

if TYPE_CHECKING:
    from swarm.diloco import DiLoCo, LocalGroup, OuterConfig
    from swarm.peer import SwarmPeer

_LAZY = {"DiLoCo": "swarm.diloco", "LocalGroup": "swarm.diloco", "OuterConfig": "swarm.diloco",
         "SwarmPeer": "swarm.peer"}


def __getattr__(name: str) -> Any:
    # Imported on first use: torch and the peer stack are heavy, and `swarm.diloco` imports
    # modules that import this package.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
