"""swarm: fault-tolerant decentralized training over the internet."""

from swarm.coordinator.config import CoordinatorConfig

__version__ = "0.1.0"

__all__ = ["CoordinatorConfig", "__version__"]
