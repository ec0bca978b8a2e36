"""DiLoCo: the training-loop hooks (`hooks.py`), the state every member holds alike (`state.py`), and
in-process members for experiments (`local.py`), and what a checkpoint of a DiLoCo peer holds (`saving.py`)."""

from swarm.diloco.hooks import Averager, DiLoCo, SyncStats
from swarm.diloco.local import LocalGroup
from swarm.diloco.saving import checkpoint_of, restore
from swarm.diloco.state import GlobalState, OuterConfig

__all__ = ["Averager", "DiLoCo", "GlobalState", "LocalGroup", "OuterConfig", "SyncStats", "checkpoint_of", "restore"]
