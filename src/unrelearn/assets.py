"""Models and detectors that ship with the package (found by listing folders, not by a list)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from unrelearn.detector import ConceptDetector
from unrelearn.errors import UnrelearnError
from unrelearn.model import DiffusionModel

ASSETS = Path(__file__).parent / "assets"
BUILTIN_PREFIX = "builtin:"


def builtin_models() -> list[str]:
    folder = ASSETS / "models"
    return sorted(p.name for p in folder.iterdir() if (p / "model_index.json").is_file()) if folder.is_dir() else []


def model_path(spec: str) -> Path:
    """``builtin:NAME`` -> the shipped folder; anything else is a path."""
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        if name not in builtin_models():
            raise UnrelearnError(
                f"unknown built-in model {name!r}; built-in models: {', '.join(builtin_models()) or 'none'}"
            )
        return ASSETS / "models" / name
    return Path(spec)


def load_model(spec: str, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load ``builtin:NAME`` or a model folder."""
    return DiffusionModel.load(model_path(spec), device=device)


def cache_dir() -> Path:
    """Where computed-once data (reference features) is kept: ``$UNRELEARN_CACHE``, else
    ``$XDG_CACHE_HOME/unrelearn``, else ``~/.cache/unrelearn``."""
    if folder := os.environ.get("UNRELEARN_CACHE"):
        return Path(folder)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unrelearn"


def detector_path(world: str) -> Path:
    return ASSETS / "detectors" / world


def load_detector(world: str) -> ConceptDetector:
    folder = detector_path(world)
    if not folder.is_dir():
        raise UnrelearnError(f"no concept detector ships for world {world!r}; train one with `unrelearn train-detector`")
    return ConceptDetector.load(folder)
