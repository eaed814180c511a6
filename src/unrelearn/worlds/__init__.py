"""Text-to-image worlds: procedural image generators with exact ground truth.

A world is what a toy model is trained on and evaluated against. Worlds register by name;
``get_world("shapes")`` returns the embedded default; ``get_world("digits")`` real handwritten
digits; ``get_world("prompts")`` the world of prompt
files that Stable Diffusion models (no procedural renderer) belong to.
"""

from unrelearn.worlds import digits as _digits  # noqa: F401  (registers "digits")
from unrelearn.worlds import prompts as _prompts  # noqa: F401  (registers "prompts")
from unrelearn.worlds import shapes as _shapes  # noqa: F401  (registers "shapes")
from unrelearn.worlds.base import ConceptSets, World, get_world, register_world, world_names

__all__ = ["ConceptSets", "World", "get_world", "register_world", "world_names"]
