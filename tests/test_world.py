import pytest
import torch

from unrelearn.errors import UnrelearnError
from unrelearn.worlds import get_world
from unrelearn.worlds.shapes import BACKGROUNDS, COLOURS, ShapesWorld


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return get_world("shapes")


def test_world_has_the_required_variety(world):
    assert len(world.attributes["shape"]) >= 6 and "circle" in world.attributes["shape"]
    assert len(world.attributes["colour"]) >= 5
    assert len(world.attributes["background"]) >= 2
    assert len(world.attributes["texture"]) >= 3 and "striped" in world.attributes["texture"]


def test_unknown_world_and_concept_fail_clearly(world):
    with pytest.raises(UnrelearnError, match="unknown world 'nope'.*shapes"):
        get_world("nope")
    with pytest.raises(UnrelearnError, match="unknown concept 'unicorn'.*circle"):
        world.concept_sets("unicorn")


def _render(world, **labels):
    row = {"shape": "square", "colour": "red", "texture": "plain", "background": "dark"} | labels
    images, index = world.render_labels([row], torch.Generator().manual_seed(0))
    return images[0], index


def test_pixels_follow_the_labels(world):
    image, _ = _render(world, colour="blue", background="light")
    level = BACKGROUNDS["light"][0]
    corners = torch.stack([image[:, 0, 0], image[:, 0, -1], image[:, -1, 0], image[:, -1, -1]])
    # At least one corner is pure background, and the most saturated pixel is the shape's colour.
    assert (corners - level).abs().max(1).values.min() < 1e-6
    flat = image.reshape(3, -1)
    strongest = flat[:, (flat - level).abs().sum(0).argmax()]
    assert torch.allclose(strongest, torch.tensor(COLOURS["blue"][0]), atol=1e-5)


def test_area_and_texture_are_what_the_label_says(world):
    def coverage(shape):
        rows = [{"shape": shape, "colour": "yellow", "texture": "plain", "background": "dark"}] * 50
        images, _ = world.render_labels(rows, torch.Generator().manual_seed(1))  # same geometry for both
        return (images - BACKGROUNDS["dark"][0]).abs().sum(1).mean((1, 2))

    disc, ring = coverage("circle"), coverage("ring")
    # The ring removes the inner (0.5 r)^2 = a quarter of the disc's area.
    assert (ring < disc).all()
    assert 0.65 < (ring.sum() / disc.sum()).item() < 0.85

    striped, _ = _render(world, shape="square", texture="striped", colour="green")
    plain, _ = _render(world, shape="square", texture="plain", colour="green")
    full = (plain[1] - COLOURS["green"][0][1]).abs() < 1e-6  # pixels the square covers entirely
    assert full.sum() >= 20
    values = striped[1][full]
    bright = (values - COLOURS["green"][0][1]).abs() < 1e-6
    dim = (values - 0.3 * COLOURS["green"][0][1]).abs() < 1e-6
    assert (bright | dim).all() and bright.any() and dim.any()
    # Stripes are horizontal: every fully covered row is either all bright or all dim.
    for row in full.any(1).nonzero().flatten():
        row_values = striped[1][row][full[row]]
        assert torch.allclose(row_values, row_values[0].expand_as(row_values))


def test_captions_state_exactly_their_attributes(world):
    generator = torch.Generator().manual_seed(0)
    _, captions = world.training_batch(200, generator)
    assert len(set(captions)) > 50
    for concept in ("circle", "striped", "red"):
        for caption in world.concept_sets(concept).evaluation:
            assert world.parse(caption.text).attributes == caption.attributes


def test_concept_sets(world):
    for concept in ("circle", "striped"):
        sets = world.concept_sets(concept)
        attribute = sets.attribute
        assert len(sets.evaluation) >= 50 and len({c.text for c in sets.evaluation}) == len(sets.evaluation)
        assert all(c.attributes[attribute] == concept for c in sets.evaluation + sets.hrm_s + sets.hrm_m)
        assert len(sets.hrm_s) == 1 and len(sets.hrm_m) >= 5
        assert all(c.attributes.get(attribute) != concept for c in sets.clean + sets.retain + sets.related)
        assert all(c.attributes.get(attribute) not in sets.related_concepts for c in sets.clean)
        assert {c.attributes[attribute] for c in sets.related} == set(sets.related_concepts)
        assert all({"shape", "colour", "texture"} <= set(c.attributes) for c in sets.retain)
    assert world.concept_sets("circle").related_concepts == ["ring"]


def test_ground_truth_of_prompts_matches_their_labels(world):
    sets = world.concept_sets("circle")
    images, index = world.render(sets.retain[:20], torch.Generator().manual_seed(0))
    for caption, shape in zip(sets.retain[:20], index["shape"].tolist()):
        assert world.attributes["shape"][shape] == caption.attributes["shape"]
    assert images.shape == (20, 3, 16, 16)


def test_excluded_concept_never_appears(world):
    generator = torch.Generator().manual_seed(3)
    for concept in ("circle", "striped"):
        attribute = world.attribute_of(concept)
        labels = world.sample_labels(300, generator, exclude=concept)
        assert all(row[attribute] != concept for row in labels)
        _, captions = world.training_batch(300, generator, exclude=concept)
        assert all(world.parse(c).attributes.get(attribute) != concept for c in captions)


def test_rendering_is_deterministic(world):
    a, _ = world.training_batch(8, torch.Generator().manual_seed(5))
    b, _ = world.training_batch(8, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
