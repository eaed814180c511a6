"""The embedded world ``shapes``: coloured, textured shapes on a plain background.

Every image is rendered from labels (shape, colour, texture, background, position, size), so
ground truth is exact. Captions are generated in free English with synonyms and several
sentence forms, and may leave attributes out, so the model sees real language through its
frozen text encoder rather than lookup keys.
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import cached_property

import torch
import torch.nn.functional as F

from unrelearn.errors import UnrelearnError
from unrelearn.worlds.base import Caption, ConceptSets, LabelledWorld, register_world

SHAPES: dict[str, list[str]] = {
    "circle": ["circle", "disc", "round disk", "dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "pyramid", "wedge"],
    "diamond": ["diamond", "rhombus", "lozenge"],
    "cross": ["cross", "plus sign", "plus"],
    "ring": ["ring", "hoop", "donut", "annulus"],
}
COLOURS: dict[str, tuple[tuple[float, float, float], list[str]]] = {
    "red": ((0.92, 0.12, 0.10), ["red", "crimson", "scarlet"]),
    "green": ((0.10, 0.72, 0.22), ["green", "emerald", "lime"]),
    "blue": ((0.15, 0.30, 0.95), ["blue", "azure", "cobalt"]),
    "yellow": ((0.96, 0.84, 0.10), ["yellow", "golden", "lemon"]),
    "purple": ((0.60, 0.15, 0.80), ["purple", "violet", "plum"]),
}
# Adjectives go before the noun; phrases after it ("a red ring with stripes").
TEXTURES: dict[str, tuple[list[str], list[str]]] = {
    "plain": (["plain", "solid", "flat-coloured"], ["in one flat colour", "with no pattern"]),
    "striped": (["striped", "stripy", "banded"], ["with stripes", "with horizontal stripes"]),
    "checkered": (["checkered", "chequered", "checkerboard"], ["with a checker pattern", "with a chessboard pattern"]),
}
BACKGROUNDS: dict[str, tuple[float, list[str]]] = {
    "light": (0.92, ["light", "white", "pale"]),
    "dark": (0.08, ["dark", "black", "night"]),
}
GENERIC_SHAPE_WORDS = ["shape", "object"]

RELATED: dict[str, list[str]] = {
    "circle": ["ring"], "ring": ["circle"], "square": ["diamond"], "diamond": ["square"],
    "triangle": ["diamond"], "cross": ["square"],
    "red": ["purple"], "purple": ["red"], "blue": ["purple"], "green": ["yellow"], "yellow": ["green"],
    "striped": ["checkered"], "checkered": ["striped"], "plain": ["striped"],
}
ALTERNATIVE: dict[str, str] = {
    "circle": "square", "square": "triangle", "triangle": "diamond", "diamond": "cross",
    "cross": "ring", "ring": "circle",
    "red": "green", "green": "blue", "blue": "yellow", "yellow": "purple", "purple": "red",
    "striped": "plain", "checkered": "plain", "plain": "striped",
}

# Off-stripes keep this share of the colour: dark enough to see, bright enough to stay the
# shape's colour on a dark background.
_PATTERN_DIM = 0.3
_SUPERSAMPLE = 4
# How often a caption states each attribute: real captions leave things out, and the model
# must learn what an unstated attribute looks like (its marginal).
_PHRASINGS_PER_SET = 8
_STATE_PROBABILITY = {"shape": 0.9, "colour": 0.85, "texture": 0.75, "background": 0.5}


class ShapesWorld(LabelledWorld):
    """Procedural 16x16 (by default) images of one shape with exact labels."""

    ground_truth = True
    concept_attributes = ("shape", "colour", "texture")

    name = "shapes"

    def __init__(self, resolution: int = 16) -> None:
        if resolution < 8:
            raise UnrelearnError(f"shapes needs a resolution of at least 8 pixels, got {resolution}")
        self.resolution = resolution
        self.attributes: dict[str, list[str]] = {
            "shape": list(SHAPES),
            "colour": list(COLOURS),
            "texture": list(TEXTURES),
            "background": list(BACKGROUNDS),
        }
        self._colour_rgb = torch.tensor([COLOURS[c][0] for c in COLOURS])
        self._background_level = torch.tensor([BACKGROUNDS[b][0] for b in BACKGROUNDS])
        self._phrasing_pool: dict[tuple[tuple[str, str], ...], list[str]] = {}

    # ------------------------------------------------------------------ concepts
    def concepts(self) -> list[str]:
        return self.attributes["shape"] + self.attributes["colour"] + self.attributes["texture"]

    def attribute_of(self, concept: str) -> str:
        for attribute in self.concept_attributes:
            if concept in self.attributes[attribute]:
                return attribute
        raise UnrelearnError(
            f"unknown concept {concept!r} in world {self.name!r}; known concepts: {', '.join(self.concepts())}"
        )

    def concept_sets(self, concept: str) -> ConceptSets:
        attribute = self.attribute_of(concept)
        rng = random.Random(_stable_seed(self.name, concept))
        related = RELATED.get(concept, [])
        others = [v for v in self.attributes[attribute] if v != concept]
        unrelated = [v for v in others if v not in related]

        evaluation = self._distinct(rng, 60, lambda: self._caption(rng, {attribute: concept}, full=False))
        hrm_m = self._distinct(rng, 8, lambda: self._caption(rng, {attribute: concept}, full=False))
        if attribute == "shape":
            hrm_s = [Caption(f"a {concept}", {"shape": concept})]
        else:
            hrm_s = [Caption(self._describe({attribute: concept}, form=0), {attribute: concept})]
        clean = self._distinct(rng, 30, lambda: self._caption(rng, {attribute: rng.choice(unrelated)}, full=False))
        related_set = self._distinct(rng, 30, lambda: self._caption(rng, {attribute: rng.choice(related)}, full=True)) if related else []
        retain = self._distinct(rng, 60, lambda: self._caption(rng, {attribute: rng.choice(others)}, full=True))
        return ConceptSets(
            concept=concept,
            forget=self._names(concept),
            preserve=[c for other in others for c in self._names(other)[:1]],
            attribute=attribute,
            evaluation=evaluation,
            hrm_s=hrm_s,
            hrm_m=hrm_m,
            clean=clean,
            related=related_set,
            retain=retain,
            related_concepts=list(related),
            alternative=ALTERNATIVE[concept],
        )

    def _names(self, concept: str) -> list[Caption]:
        """Short prompts that just name the concept, one per synonym ("a disc", "a striped shape")."""
        attribute = self.attribute_of(concept)
        if attribute == "shape":
            texts = [f"a {word}" for word in SHAPES[concept]]
        elif attribute == "colour":
            texts = [f"a {word} shape" for word in COLOURS[concept][1]]
        else:
            adjectives, phrases = TEXTURES[concept]
            texts = [f"a {word} shape" for word in adjectives] + [f"a shape {phrase}" for phrase in phrases]
        return [Caption(text, {attribute: concept}) for text in texts]

    @staticmethod
    def _distinct(rng: random.Random, n: int, make) -> list[Caption]:
        seen: dict[str, Caption] = {}
        for _ in range(50 * n):
            caption = make()
            seen.setdefault(caption.text, caption)
            if len(seen) == n:
                break
        return list(seen.values())

    # ------------------------------------------------------------------ captions
    def _caption(self, rng: random.Random, fixed: dict[str, str], full: bool) -> Caption:
        """A caption stating ``fixed`` and, unless ``full``, a random subset of the rest."""
        attributes: dict[str, str] = {}
        for attribute, values in self.attributes.items():
            if attribute in fixed:
                attributes[attribute] = fixed[attribute]
            elif full and attribute != "background" or rng.random() < _STATE_PROBABILITY[attribute]:
                attributes[attribute] = rng.choice(values)
        return Caption(self._describe(attributes, rng=rng), attributes)

    def _describe(self, attributes: dict[str, str], rng: random.Random | None = None, form: int | None = None) -> str:
        """English for ``attributes``: synonyms and sentence form drawn from ``rng``."""
        pick = (lambda options: options[0]) if rng is None else rng.choice
        form = form if form is not None else (rng.randrange(5) if rng else 0)
        shape = pick(SHAPES[attributes["shape"]]) if "shape" in attributes else pick(GENERIC_SHAPE_WORDS)
        colour = pick(COLOURS[attributes["colour"]][1]) if "colour" in attributes else ""
        texture_adjective, texture_phrase = "", ""
        if "texture" in attributes:
            adjectives, phrases = TEXTURES[attributes["texture"]]
            if form in (1,) and rng is not None:
                texture_phrase = pick(phrases)
            else:
                texture_adjective = pick(adjectives)
        background = ""
        if "background" in attributes:
            background_word = pick(BACKGROUNDS[attributes["background"]][1])
            background = pick([f"on a {background_word} background", f"against a {background_word} backdrop"])
        if form == 0:
            words = ["a", texture_adjective, colour, shape, texture_phrase, background]
        elif form == 1:
            words = ["a", colour, shape, texture_phrase, background]
        elif form == 2:
            words = ["a picture of a", texture_adjective, colour, shape, background]
        elif form == 3:
            words = ["a", colour, texture_adjective, shape, background]
        else:
            parts = [shape, colour, texture_adjective]
            if background:
                parts.append(background.split(" ", 1)[1].replace("a ", "", 1))
            return ", ".join(p for p in parts if p)
        return " ".join(w for w in words if w)

    def describe(self, attributes: dict[str, str]) -> str:
        """The canonical caption of ``attributes`` ("a striped red circle on a dark background")."""
        return self._describe(attributes, form=0)

    @cached_property
    def _vocabulary(self) -> list[tuple[re.Pattern[str], str, str]]:
        entries: list[tuple[str, str, str]] = []
        for shape, words in SHAPES.items():
            entries += [(w, "shape", shape) for w in words]
        for colour, (_, words) in COLOURS.items():
            entries += [(w, "colour", colour) for w in words]
        for texture, (adjectives, phrases) in TEXTURES.items():
            entries += [(w, "texture", texture) for w in adjectives + phrases]
        for background, (_, words) in BACKGROUNDS.items():
            entries += [(f"{w} background", "background", background) for w in words]
            entries += [(f"{w} backdrop", "background", background) for w in words]
        entries.sort(key=lambda e: -len(e[0]))
        return [(re.compile(rf"\b{re.escape(w)}\b"), attribute, value) for w, attribute, value in entries]

    def parse(self, text: str) -> Caption:
        """The attributes a free-text prompt states, by longest-synonym match."""
        remaining = text.lower()
        attributes: dict[str, str] = {}
        for pattern, attribute, value in self._vocabulary:
            if attribute not in attributes and pattern.search(remaining):
                attributes[attribute] = value
                remaining = pattern.sub(" ", remaining)
        return Caption(text, attributes)

    # ------------------------------------------------------------------ images
    def sample_labels(self, n: int, generator: torch.Generator, exclude: str | None = None) -> list[dict[str, str]]:
        excluded_attribute = self.attribute_of(exclude) if exclude else None
        labels = []
        for _ in range(n):
            row = {}
            for attribute, values in self.attributes.items():
                allowed = [v for v in values if not (attribute == excluded_attribute and v == exclude)]
                row[attribute] = allowed[int(torch.randint(len(allowed), (1,), generator=generator))]
            labels.append(row)
        return labels

    def training_batch(
        self, n: int, generator: torch.Generator, exclude: str | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        """Images in [0, 1] and captions; ``exclude`` removes a concept from both."""
        rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
        labels = self.sample_labels(n, generator, exclude)
        captions = []
        for row in labels:
            stated = {a: v for a, v in row.items() if rng.random() < _STATE_PROBABILITY[a]}
            captions.append(rng.choice(self._phrasings(tuple(sorted(stated.items())))))
        images, _ = self.render_labels(labels, generator)
        return images, captions

    def _phrasings(self, stated: tuple[tuple[str, str], ...]) -> list[str]:
        """A fixed set of training phrasings for one set of stated attributes.

        Training draws from this finite pool (504 attribute sets x up to 8 phrasings) so that
        the frozen encoder's outputs can be cached; evaluation prompts are phrased afresh and
        test generalisation to unseen wordings.
        """
        # Cached per instance (a functools.cache on the method would keep every world alive).
        if stated not in self._phrasing_pool:
            rng = random.Random(_stable_seed(self.name, repr(stated)))
            pool = dict.fromkeys(self._describe(dict(stated), rng=rng) for _ in range(_PHRASINGS_PER_SET))
            self._phrasing_pool[stated] = list(pool)
        return self._phrasing_pool[stated]

    def auxiliary_captions(self, sets: ConceptSets, size: int, generator: torch.Generator) -> list[Caption]:
        """Prompts of DiMRA's auxiliary set: the retain distribution (the concept's attribute set
        to other values), phrased afresh so that none is a leaked retain prompt."""
        rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
        others = [v for v in self.attributes[sets.attribute] if v != sets.concept]
        leaked = {c.text for c in sets.retain}
        captions: list[Caption] = []
        while len(captions) < size:
            labels = self.sample_labels(1, generator, exclude=sets.concept)[0]
            labels[sets.attribute] = rng.choice(others)
            text = self.describe(labels)
            if text not in leaked:
                captions.append(Caption(text, labels))
        return captions

    def render_labels(
        self, labels: list[dict[str, str]], generator: torch.Generator, heldout: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Render one image per label row; returns images (N, 3, R, R) in [0, 1] and label indices.

        ``heldout`` changes nothing: every render is a fresh draw, held out by construction.
        """
        n, size = len(labels), self.resolution
        index = {a: torch.tensor([self.attributes[a].index(row[a]) for row in labels]) for a in self.attributes}
        radius = (0.25 + 0.19 * torch.rand(n, generator=generator)) * size
        centre = radius[:, None] * 0.9 + torch.rand(n, 2, generator=generator) * (size - 1.8 * radius[:, None])
        phase = torch.randint(4, (n, 2), generator=generator)

        fine = size * _SUPERSAMPLE
        coords = (torch.arange(fine) + 0.5) / _SUPERSAMPLE
        y, x = torch.meshgrid(coords, coords, indexing="ij")
        dx = (x[None] - centre[:, 0, None, None]) / radius[:, None, None]
        dy = (y[None] - centre[:, 1, None, None]) / radius[:, None, None]
        masks = torch.stack([_shape_mask(name, dx, dy) for name in SHAPES], dim=1)
        mask = masks[torch.arange(n), index["shape"]].float()
        coverage = F.avg_pool2d(mask[:, None], _SUPERSAMPLE)[:, 0]

        pixel = torch.arange(size)
        row_band = ((pixel[None, :, None] + phase[:, 1, None, None]) // 2) % 2
        col_band = ((pixel[None, None, :] + phase[:, 0, None, None]) // 2) % 2
        striped = torch.where(row_band.expand(n, size, size) == 0, 1.0, _PATTERN_DIM)
        checkered = torch.where((row_band + col_band) % 2 == 0, 1.0, _PATTERN_DIM)
        patterns = torch.stack([torch.ones(n, size, size), striped, checkered], dim=1)
        pattern = patterns[torch.arange(n), index["texture"]]

        colour = self._colour_rgb[index["colour"]][:, :, None, None]
        background = self._background_level[index["background"]][:, None, None, None]
        images = background + coverage[:, None] * (colour * pattern[:, None] - background)
        return images.clamp(0, 1), index


def _shape_mask(name: str, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Inside-test on coordinates relative to the centre, in units of the radius."""
    if name == "circle":
        return dx**2 + dy**2 <= 1
    if name == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= 1) & (d2 >= 0.5**2)
    if name == "square":
        return (dx.abs() <= 0.8) & (dy.abs() <= 0.8)
    if name == "diamond":
        return dx.abs() + dy.abs() <= 1
    if name == "triangle":
        return (dy >= -1) & (dy <= 0.75) & (dx.abs() <= (dy + 1) / 1.75)
    if name == "cross":
        return ((dx.abs() <= 0.33) & (dy.abs() <= 1)) | ((dy.abs() <= 0.33) & (dx.abs() <= 1))
    raise ValueError(name)


def _stable_seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:8], "little")


@register_world("shapes")
def _make_shapes() -> ShapesWorld:
    return ShapesWorld()
