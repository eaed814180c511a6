"""The world ``digits``: real handwritten digits (scikit-learn's 1,797 8x8 scans), upsampled.

The DiMRA/DiMUM paper unlearns a *class* from a class-conditional diffusion model (CIFAR-10);
this world asks the same question offline, on real images: every image the world "renders" is
a scan from the data set, drawn from the training split, or from the held-out split when the
attacker's auxiliary data is asked for (the paper's assumption (ii): same distribution, never
seen in training). Prompts are English paraphrases ("a handwritten digit seven", "the number 7,
handwritten", ...) read by the frozen text encoder, as in ``shapes``.
"""

from __future__ import annotations

import hashlib
import random
import re
from functools import cache, cached_property

import torch
import torch.nn.functional as F

from unrelearn.errors import UnrelearnError
from unrelearn.worlds.base import Caption, ConceptSets, LabelledWorld, register_world

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# The paper's phrasing families: the class named as a word or as a numeral, in several forms.
# Training and evaluation draw from the same templates, as a class-conditional model's label
# is the same at training and test time; the forget set is the class, not a wording.
TEMPLATES = [
    "a handwritten digit {word}",
    "the number {numeral}, handwritten",
    "a handwritten {word}",
    "the digit {numeral}",
    "a scanned handwritten {numeral}",
    "the numeral {word} written by hand",
    "a {word} written with a pen",
    "an image of the digit {word}",
    "a picture of a handwritten number {numeral}",
    "someone's handwriting of the number {word}",
    "a hand-drawn {numeral}",
    "a {numeral}, handwritten in ink",
]
GENERIC = ["a handwritten digit", "a digit written by hand", "a scanned handwritten number"]
# Pairs the digits data set's classifiers confuse most: the knowledge next to the concept that
# unlearning must keep (the "related" set, the "skin" of "nudity").
RELATED = {
    "zero": ["six"], "one": ["seven"], "two": ["three"], "three": ["eight"], "four": ["nine"],
    "five": ["six"], "six": ["five"], "seven": ["one"], "eight": ["three"], "nine": ["four"],
}  # fmt: skip
HELDOUT_FRACTION = 0.2
# A training caption names its digit with this probability; otherwise it is generic, so the
# model learns the marginal of an unstated digit as shapes' models do.
_STATE_PROBABILITY = 0.9


@cache
def _dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scans as (N, 8, 8) ink intensities in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return torch.tensor(data.images, dtype=torch.float32) / 16.0, torch.tensor(data.target, dtype=torch.long)


def split_indices(labels: torch.Tensor, heldout_fraction: float = HELDOUT_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified, fixed train / held-out split: per class, the last ``heldout_fraction`` of a
    seeded permutation is held out."""
    generator = torch.Generator().manual_seed(_stable_seed("digits", "split"))
    train, heldout = [], []
    for digit in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == digit).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = len(members) - round(heldout_fraction * len(members))
        train.append(members[:cut])
        heldout.append(members[cut:])
    return torch.cat(train).sort().values, torch.cat(heldout).sort().values


class DigitsWorld(LabelledWorld):
    """Real handwritten digits at ``resolution`` pixels, white ink on black, three channels."""

    name = "digits"
    ground_truth = True
    concept_attributes = ("digit",)

    def __init__(self, resolution: int = 16) -> None:
        if resolution < 8:
            raise UnrelearnError(f"digits needs a resolution of at least 8 pixels, got {resolution}")
        self.resolution = resolution
        self.attributes: dict[str, list[str]] = {"digit": list(DIGITS)}
        scans, labels = _dataset()
        train, heldout = split_indices(labels)
        images = F.interpolate(scans[:, None], size=(resolution, resolution), mode="bilinear", align_corners=False)
        self._images = images.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()
        self._labels = labels
        self._members = {
            split: [indices[labels[indices] == d] for d in range(len(DIGITS))]
            for split, indices in (("train", train), ("heldout", heldout))
        }

    def split_size(self, split: str) -> int:
        return sum(len(m) for m in self._members[split])

    # ------------------------------------------------------------------ concepts
    def concepts(self) -> list[str]:
        return list(DIGITS)

    def attribute_of(self, concept: str) -> str:
        if concept not in DIGITS:
            raise UnrelearnError(
                f"unknown concept {concept!r} in world 'digits'; known concepts: {', '.join(DIGITS)}"
            )
        return "digit"

    def phrasings(self, digit: str) -> list[str]:
        """Every prompt of the world that names ``digit``."""
        numeral = str(DIGITS.index(digit))
        return [t.format(word=digit, numeral=numeral) for t in TEMPLATES]

    def concept_sets(self, concept: str) -> ConceptSets:
        self.attribute_of(concept)
        rng = random.Random(_stable_seed(self.name, concept))
        related = RELATED[concept]
        others = [d for d in DIGITS if d != concept]
        unrelated = [d for d in others if d not in related]
        alternative = DIGITS[(DIGITS.index(concept) + 1) % len(DIGITS)]

        def captions(digit: str) -> list[Caption]:
            return [Caption(text, {"digit": digit}) for text in self.phrasings(digit)]

        own = captions(concept)
        shuffled = rng.sample(own, len(own))
        # Interleaved so that any prefix of the retain set (the evaluation cycles through it)
        # covers the classes evenly.
        per_class = {d: rng.sample(captions(d), 7) for d in others}
        retain = [per_class[d][k] for k in range(7) for d in others]
        clean = [c for d in unrelated for c in captions(d)]
        return ConceptSets(
            concept=concept,
            attribute="digit",
            evaluation=own,
            hrm_s=[Caption(self.describe({"digit": concept}), {"digit": concept})],
            hrm_m=shuffled[:8],
            clean=rng.sample(clean, 30),
            related=[c for d in related for c in captions(d)],
            retain=retain,
            forget=self._names(concept),
            preserve=[self._names(d)[0] for d in others],
            related_concepts=list(related),
            alternative=alternative,
        )

    def _names(self, digit: str) -> list[Caption]:
        numeral = str(DIGITS.index(digit))
        texts = [f"the digit {digit}", f"the number {numeral}", f"a {digit}", f"a handwritten {numeral}"]
        return [Caption(text, {"digit": digit}) for text in texts]

    # ------------------------------------------------------------------ captions
    @cached_property
    def _vocabulary(self) -> list[tuple[re.Pattern[str], str]]:
        entries = [(re.compile(rf"\b{word}\b"), word) for word in DIGITS]
        entries += [(re.compile(rf"(?<![\d.]){i}(?![\d.])"), word) for i, word in enumerate(DIGITS)]
        return entries

    def parse(self, text: str) -> Caption:
        """The digit a free-text prompt names (the first one found), if any."""
        lowered = text.lower()
        found = [(m.start(), word) for pattern, word in self._vocabulary if (m := pattern.search(lowered))]
        return Caption(text, {"digit": min(found)[1]} if found else {})

    def describe(self, attributes: dict[str, str]) -> str:
        if "digit" not in attributes:
            return GENERIC[0]
        return TEMPLATES[0].format(word=attributes["digit"], numeral=DIGITS.index(attributes["digit"]))

    # ------------------------------------------------------------------ images
    def sample_labels(self, n: int, generator: torch.Generator, exclude: str | None = None) -> list[dict[str, str]]:
        allowed = [d for d in DIGITS if d != exclude]
        picks = torch.randint(len(allowed), (n,), generator=generator).tolist()
        return [{"digit": allowed[i]} for i in picks]

    def render_labels(
        self, labels: list[dict[str, str]], generator: torch.Generator, heldout: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One scan per label row, drawn at random from that digit's scans in the split."""
        members = self._members["heldout" if heldout else "train"]
        index = torch.tensor([DIGITS.index(row["digit"]) for row in labels], dtype=torch.long)
        picks = []
        for digit in index.tolist():
            pool = members[digit]
            picks.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
        chosen = torch.stack(picks) if picks else torch.zeros(0, dtype=torch.long)
        return self._images[chosen].clone(), {"digit": index}

    def training_batch(
        self, n: int, generator: torch.Generator, exclude: str | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        """Scans of the training split (without ``exclude``'s) with one paraphrase each."""
        allowed = torch.cat([m for d, m in zip(DIGITS, self._members["train"]) if d != exclude])
        chosen = allowed[torch.randint(len(allowed), (n,), generator=generator)]
        rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
        captions = []
        for label in self._labels[chosen].tolist():
            if rng.random() < _STATE_PROBABILITY:
                captions.append(rng.choice(self.phrasings(DIGITS[label])))
            else:
                captions.append(rng.choice(GENERIC))
        return self._images[chosen].clone(), captions

    def auxiliary_captions(self, sets: ConceptSets, size: int, generator: torch.Generator) -> list[Caption]:
        """Prompts of DiMRA's auxiliary set: the other digits in the world's phrasings (its images
        come from the held-out split: ``render(..., heldout=True)``)."""
        rng = random.Random(int(torch.randint(2**62, (1,), generator=generator)))
        labels = self.sample_labels(size, generator, exclude=sets.concept)
        return [Caption(rng.choice(self.phrasings(row["digit"])), row) for row in labels]


def _stable_seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:8], "little")


@register_world("digits")
def _make_digits() -> DigitsWorld:
    return DigitsWorld()
