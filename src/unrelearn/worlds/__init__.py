"""Text-to-image worlds: procedural image generators with exact ground truth.

A world is what a toy model is trained on and evaluated against. Worlds register by name;
``get_world("shapes")`` returns the embedded default.
"""

from unrelearn.worlds import shapes as _shapes  # noqa: F401  (registers "shapes")
from unrelearn.worlds.base import ConceptSets, World, get_world, register_world, world_names

__all__ = ["ConceptSets", "World", "get_world", "register_world", "world_names"]
