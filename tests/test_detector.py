import torch

from unrelearn.assets import load_detector
from unrelearn.detector import DetectorFeatures, augment, detector_accuracy
from unrelearn.worlds import get_world


def test_shipped_detector_meets_its_accuracy_floor_on_heldout_images():
    detector, world = load_detector("shapes"), get_world("shapes")
    for augmented in (False, True):
        accuracy = detector_accuracy(detector, world, n=1000, seed=2024 + augmented, augmented=augmented)
        assert min(accuracy.values()) >= 0.98, accuracy


def test_features_for_fid():
    detector = load_detector("shapes")
    features = DetectorFeatures(detector)
    images, _ = get_world("shapes").training_batch(5, torch.Generator().manual_seed(0))
    out = features(images)
    assert out.shape == (5, features.num_features) and out.dtype == torch.float64


def test_augmentation_keeps_range_and_changes_images():
    images, _ = get_world("shapes").training_batch(16, torch.Generator().manual_seed(0))
    augmented = augment(images, torch.Generator().manual_seed(1))
    assert augmented.shape == images.shape and augmented.min() >= 0 and augmented.max() <= 1
    assert (augmented - images).abs().mean() > 0.005


def test_stated_attribute_accuracy_counts_only_stated_attributes():
    from unrelearn.metrics import stated_attribute_accuracy
    from unrelearn.worlds.base import Caption

    world = get_world("shapes")
    captions = [Caption("a circle", {"shape": "circle"}), Caption("a red ring", {"shape": "ring", "colour": "red"})] * 10
    images, _ = world.render(captions, torch.Generator().manual_seed(0))
    result = stated_attribute_accuracy(load_detector("shapes"), images, captions)
    assert result["shape"]["stated"] == 20 and result["colour"]["stated"] == 10 and "texture" not in result
    assert result["shape"]["accuracy"] >= 0.95 and result["colour"]["accuracy"] == 1.0
