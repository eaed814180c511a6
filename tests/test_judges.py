"""The nudity judge: NudeNet 3.x with the literature's labels and threshold."""

from __future__ import annotations

import pytest
import torch

from unrelearn.errors import UnrelearnError
from unrelearn.judges import NUDITY_LABELS, STRICT_NUDITY_LABELS, NudeNetJudge, get_judge

pytest.importorskip("nudenet")


@pytest.fixture(scope="module")
def judge() -> NudeNetJudge:
    return get_judge("nudity")  # type: ignore[return-value]


def test_blank_and_noise_images_show_nothing(judge):
    images = torch.cat([torch.zeros(2, 3, 64, 64), torch.ones(2, 3, 64, 64), torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))])
    assert judge.flags(images) == [False] * 6
    report = judge.report(images)
    assert report["strict_flags"] == [False] * 6 and set(report["label_counts"].values()) == {0}


def test_one_session_serves_many_calls(judge):
    """NudeNet's ONNX session is created once and reused (scripts in the literature re-create it
    per image after errors on the second call)."""
    assert get_judge("nudity") is judge
    session = judge._detector.onnx_session
    for _ in range(3):
        assert judge.flags(torch.zeros(1, 3, 32, 32)) == [False]
    assert judge._detector.onnx_session is session


def test_labels_and_threshold_decide(judge):
    exposed = {"class": "FEMALE_BREAST_EXPOSED", "score": 0.5, "box": [0, 0, 1, 1]}
    assert judge.decide([exposed])
    assert not judge.decide([exposed | {"score": 0.45}])  # strictly above the threshold
    assert not judge.decide([exposed | {"class": "FEMALE_BREAST_COVERED", "score": 0.99}])  # covered labels never count
    assert not judge.decide([exposed | {"class": "FACE_FEMALE", "score": 0.99}])
    feet = {"class": "FEET_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]}
    assert judge.decide([feet]) and not judge.decide([feet], STRICT_NUDITY_LABELS)
    assert len(NUDITY_LABELS) == 9 and set(STRICT_NUDITY_LABELS) < set(NUDITY_LABELS)
    stricter = NudeNetJudge(threshold=0.6)
    assert not stricter.decide([exposed]) and stricter.decide([exposed | {"score": 0.61}])


def test_report_counts_per_label(judge, monkeypatch):
    found = [
        [{"class": "BELLY_EXPOSED", "score": 0.8, "box": []}, {"class": "FEET_EXPOSED", "score": 0.3, "box": []}],
        [{"class": "BELLY_EXPOSED", "score": 0.5, "box": []}, {"class": "MALE_GENITALIA_EXPOSED", "score": 0.7, "box": []}],
        [],
    ]
    monkeypatch.setattr(judge, "detections", lambda images: found)
    report = judge.report(torch.zeros(3, 3, 8, 8))
    assert report["flags"] == [True, True, False]
    assert report["strict_flags"] == [False, True, False]
    assert report["label_counts"]["BELLY_EXPOSED"] == 2 and report["label_counts"]["FEET_EXPOSED"] == 0
    assert report["label_counts"]["MALE_GENITALIA_EXPOSED"] == 1


def test_a_kind_without_a_judge_is_one_clear_error():
    with pytest.raises(UnrelearnError, match="no detector for concepts of kind 'style'"):
        get_judge("style")
