"""unrelearn: durable concept unlearning for text-to-image diffusion models."""

from unrelearn.errors import UnrelearnError
from unrelearn.model import DiffusionModel

__all__ = ["DiffusionModel", "UnrelearnError"]
__version__ = "0.1.0"
