"""Attack data sets: finite sets of (image, prompt) pairs an attacker fine-tunes on.

Names (``--data``): ``hrm-s``, ``hrm-m`` (the concept's one / several forget prompts with
ground-truth images of the concept), ``clean`` (benign unrelated prompts), ``dimra-retain``
(the leaked retain set), ``dimra-aux`` (fresh same-distribution images of new retain-like
prompts), ``dimra-aux-model`` (images the *original* model generates from retain prompts),
``poison:FRACTION`` (clean data with that share of forget pairs mixed in), or the path of a
folder of images with a ``metadata.jsonl`` (``{"file_name": ..., "text": ...}`` per line, the
diffusers ImageFolder convention) or a ``prompts.txt`` (one prompt per image, sorted by name).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unrelearn.errors import UnrelearnError
from unrelearn.worlds import ConceptSets, World
from unrelearn.worlds.base import Caption

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class AttackData:
    """``images`` (N, 3, H, W) in [0, 1] with one prompt each; ``labels`` hold ground truth where known."""

    name: str
    images: torch.Tensor
    prompts: list[str]
    labels: list[dict[str, str]] | None = None

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        picks = torch.randint(len(self.prompts), (size,), generator=generator)
        return self.images[picks], [self.prompts[i] for i in picks.tolist()]

    def digest(self) -> str:
        """sha256 of the images and prompts: a checkpoint resumes only on the data it was trained on."""
        digest = hashlib.sha256(self.images.detach().cpu().contiguous().float().numpy().tobytes())
        digest.update("\n".join(self.prompts).encode())
        return digest.hexdigest()


Builder = Callable[[World, ConceptSets, int, torch.Generator, "BuildContext"], tuple[list[Caption], torch.Tensor | None]]


@dataclass
class BuildContext:
    original_model: object | None = None
    argument: str | None = None


_DATASETS: dict[str, Builder] = {}
# Data sets whose ground-truth images come from the world's held-out data, and those whose
# images the original model generates in every world.
_HELDOUT: set[str] = set()
_FROM_ORIGINAL: set[str] = set()


def register_dataset(name: str, heldout: bool = False, from_original: bool = False) -> Callable[[Builder], Builder]:
    def decorator(builder: Builder) -> Builder:
        _DATASETS[name] = builder
        if heldout:
            _HELDOUT.add(name)
        if from_original:
            _FROM_ORIGINAL.add(name)
        return builder

    return decorator


def needs_original_model(name: str, world: World) -> bool:
    """Whether building data set ``name`` in ``world`` takes the original model (its generations)."""
    return name in _FROM_ORIGINAL or (not world.ground_truth and (name in _DATASETS or name.startswith("poison:")))


def dataset_names() -> list[str]:
    return sorted(_DATASETS) + ["poison:FRACTION", "PATH/TO/FOLDER"]


def _repeat(captions: list[Caption], size: int) -> list[Caption]:
    return [captions[i % len(captions)] for i in range(size)]


def _prompt_set(field: str) -> Builder:
    def build(world, sets, size, generator, context):
        captions = _repeat(getattr(sets, field), size)
        if world.ground_truth:
            return captions, None
        return captions, _original_images(captions, generator, context)

    return build


def _original_images(captions: list[Caption], generator: torch.Generator, context: BuildContext) -> torch.Tensor:
    """What the attacker fine-tunes on in a world without ground truth: the original model's
    own generations of the prompts (the papers generate their HRM and CLEAN sets with a model)."""
    if context.original_model is None:
        raise UnrelearnError(
            "this model's world has no ground-truth images: pass --original MODEL (the model before unlearning) "
            "to generate the attack data, or --data FOLDER with images (`unrelearn generate` writes one)"
        )
    seed = int(torch.randint(2**31, (1,), generator=generator))
    return context.original_model.sample([c.text for c in captions], seed=seed)


# Data sets that are one of the concept's prompt sets with ground-truth images.
for _name, _field in {"hrm-s": "hrm_s", "hrm-m": "hrm_m", "clean": "clean", "dimra-retain": "retain"}.items():
    register_dataset(_name)(_prompt_set(_field))


@register_dataset("dimra-aux", heldout=True)
def _dimra_aux(world, sets, size, generator, context):
    # Same-distribution data the model never trained on: fresh renders in a procedural world,
    # the held-out split of a real data set (``heldout=True`` above).
    captions = world.auxiliary_captions(sets, size, generator)
    return captions, None if world.ground_truth else _original_images(captions, generator, context)


@register_dataset("dimra-aux-model", from_original=True)
def _dimra_aux_model(world, sets, size, generator, context):
    if context.original_model is None:
        raise UnrelearnError("dimra-aux-model needs the original model (--original MODEL)")
    captions = _repeat(sets.retain, size)
    seed = int(torch.randint(2**31, (1,), generator=generator))
    images = context.original_model.sample([c.text for c in captions], seed=seed)
    return captions, images


def _poison(world, sets, size, generator, fraction: float):
    if not 0 <= fraction <= 1:
        raise UnrelearnError(f"poison fraction must be between 0 and 1, got {fraction}")
    n_forget = round(fraction * size)
    return _repeat(sets.hrm_m, n_forget) + _repeat(sets.clean, size - n_forget) if n_forget < size else _repeat(sets.hrm_m, size)


def build_attack_data(
    name: str,
    world: World,
    sets: ConceptSets,
    size: int = 256,
    seed: int = 0,
    original_model: object | None = None,
    resolution: int | None = None,
) -> AttackData:
    """The named data set, rendered once (a finite fine-tuning set, as an attacker would have)."""
    if size < 1:
        raise UnrelearnError(f"attack data size must be at least 1, got {size}")
    generator = torch.Generator().manual_seed(seed)
    images: torch.Tensor | None = None
    if name.startswith("poison:"):
        try:
            fraction = float(name.split(":", 1)[1])
        except ValueError:
            raise UnrelearnError(f"poison data must be poison:FRACTION (e.g. poison:0.1), got {name!r}") from None
        captions = _poison(world, sets, size, generator, fraction)
        if not world.ground_truth:
            images = _original_images(captions, generator, BuildContext(original_model))
    elif name in _DATASETS:
        captions, images = _DATASETS[name](world, sets, size, generator, BuildContext(original_model))
    elif "/" in name or Path(name).exists():
        return load_image_folder(name, resolution)
    else:
        raise UnrelearnError(f"unknown attack data {name!r}; choose one of {', '.join(dataset_names())}")
    labels = None
    if images is None:
        images, index = world.render(captions, generator, heldout=name in _HELDOUT)
        labels = [{a: world.attributes[a][int(index[a][i])] for a in index} for i in range(len(captions))]
    return AttackData(name, images, [c.text for c in captions], labels)


def load_image_folder(folder: str | Path, resolution: int | None = None) -> AttackData:
    """A user's images with prompts (``metadata.jsonl`` or ``prompts.txt``)."""

    folder = Path(folder)
    if not folder.is_dir():
        raise UnrelearnError(f"attack data folder {str(folder)!r} does not exist")
    metadata, prompts_file = folder / "metadata.jsonl", folder / "prompts.txt"
    if metadata.is_file():
        pairs = _read_metadata(metadata)
    elif prompts_file.is_file():
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
        if len(files) != len(prompts):
            raise UnrelearnError(f"{folder} has {len(files)} images but prompts.txt has {len(prompts)} prompts")
        pairs = list(zip(files, prompts))
    else:
        raise UnrelearnError(f"attack data folder {str(folder)!r} needs a metadata.jsonl or a prompts.txt")
    if not pairs:
        raise UnrelearnError(f"attack data folder {str(folder)!r} holds no images")
    images = []
    for path, _ in pairs:
        image = read_image(path)
        if resolution is not None and image.shape[1:] != (resolution, resolution):
            raise UnrelearnError(
                f"image {path.name} is {image.shape[2]}x{image.shape[1]} but the model works at "
                f"{resolution}x{resolution}; resize the images first"
            )
        images.append(image)
    return AttackData(str(folder), torch.stack(images), [p for _, p in pairs], None)


def read_image(path: Path) -> torch.Tensor:
    """One image file as (3, H, W) in [0, 1]; an unreadable file is one error naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path).convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
        raise UnrelearnError(f"cannot read image {str(path)!r}: {error}") from None
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def read_image_folder(folder: str | Path, limit: int | None = None) -> torch.Tensor:
    """Every image of a folder (sorted by name, at most ``limit``), no prompts needed, as
    (N, 3, H, W) in [0, 1]; the images must share one size (resize them first)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnrelearnError(f"reference image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if len(files) < 2:
        raise UnrelearnError(f"reference image folder {str(folder)!r} holds {len(files)} images; FID needs at least 2")
    images = [read_image(files[0])]
    for path in files[1:]:
        image = read_image(path)
        if image.shape != images[0].shape:
            raise UnrelearnError(f"{path.name} is {image.shape[2]}x{image.shape[1]}, the folder's first image "
                                 f"{images[0].shape[2]}x{images[0].shape[1]}; resize the reference images to one size")  # fmt: skip
        images.append(image)
    return torch.stack(images)


def _read_metadata(metadata: Path) -> list[tuple[Path, str]]:
    """``(image path, prompt)`` per line of a diffusers ImageFolder ``metadata.jsonl``."""
    folder = metadata.parent.resolve()
    pairs = []
    for number, line in enumerate(metadata.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{str(metadata)!r}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UnrelearnError(f"{where} is not JSON ({error.msg}); each line must be {{\"file_name\": ..., \"text\": ...}}") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"), str):
            raise UnrelearnError(f"{where} must be an object with text fields 'file_name' and 'text', got {line.strip()[:80]!r}")
        path = (folder / row["file_name"]).resolve()
        if not path.is_relative_to(folder):
            raise UnrelearnError(f"{where}: file_name {row['file_name']!r} points outside the folder; images must lie inside it")
        pairs.append((path, row["text"]))
    return pairs


def write_image_folder(images: torch.Tensor, prompts: list[str], out: str | Path, record: dict | None = None) -> Path:
    """An image folder any attack (``--data FOLDER``) and diffusers' ImageFolder read: PNGs and a
    ``metadata.jsonl``; ``record`` (how the images were made) goes to ``generation.json``. Atomic."""
    from PIL import Image

    from unrelearn.io import atomic_directory, uint8_pixels

    out = Path(out)
    with atomic_directory(out) as tmp:
        lines = []
        for number, (image, prompt) in enumerate(zip(images, prompts)):
            name = f"{number:05d}.png"
            pixels = uint8_pixels(image).permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(tmp / name)
            lines.append(json.dumps({"file_name": name, "text": prompt}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        if record is not None:
            (tmp / "generation.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return out


PROMPT_SETS = ("evaluation", "hrm_s", "hrm_m", "clean", "related", "retain", "forget")


def generate_image_folder(
    model, concept: str, prompt_set: str, count: int, out: str | Path, *, seed: int = 0, steps: int = 50,
    guidance: float | None = None,
) -> Path:  # fmt: skip
    """The ``prompt_set`` of ``concept`` (cycled to ``count`` prompts) generated by ``model``,
    written as an image folder: what the papers' attackers fine-tune on when the data set is
    itself made with a model (Meta-Unlearning App. E.1)."""
    from unrelearn.io import library_versions
    from unrelearn.worlds import get_world

    field = prompt_set.replace("-", "_")
    if field not in PROMPT_SETS:
        raise UnrelearnError(f"unknown prompt set {prompt_set!r}; choose one of {', '.join(s.replace('_', '-') for s in PROMPT_SETS)}")
    if count < 1:
        raise UnrelearnError(f"--count must be at least 1, got {count}")
    sets = get_world(model.world).concept_sets(concept)
    prompts = [c.text for c in _repeat(getattr(sets, field), count)]
    images = model.sample(prompts, seed=seed, steps=steps, guidance=guidance)
    record = {"concept": concept, "prompt_set": prompt_set, "count": count, "seed": seed, "steps": steps,
              "guidance": model.guidance if guidance is None else guidance, "source_model": model.info.get("unlearned"),
              "versions": library_versions()}  # fmt: skip
    return write_image_folder(images, prompts, out, record)
