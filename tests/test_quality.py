"""The quality metrics: k-NN precision against a cached reference, FID and KID on features."""

from __future__ import annotations

import torch

from unrelearn.assets import load_detector
from unrelearn.evaluate import _REFERENCE_CACHE, reference_features, reference_radii
from unrelearn.metrics import (
    frechet_distance,
    kernel_distance,
    manifold_distances,
    manifold_precision_flags,
    neighbour_radii,
)
from unrelearn.worlds import get_world


def test_neighbour_radii_are_the_kth_nearest_other_sample():
    points = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    radii = neighbour_radii(points, k=3, chunk=7)
    for i in range(50):
        others = sorted(float((points[i] - points[j]).norm()) for j in range(50) if j != i)
        assert abs(float(radii[i]) - others[2]) < 1e-12


def test_precision_is_one_on_the_reference_and_zero_far_from_it():
    generator = torch.Generator().manual_seed(1)
    reference = torch.randn(400, 8, generator=generator, dtype=torch.float64)
    radii = neighbour_radii(reference, k=5)
    assert all(manifold_precision_flags(reference, radii, reference[:100]))
    fresh = torch.randn(300, 8, generator=generator, dtype=torch.float64)
    inside = sum(manifold_precision_flags(reference, radii, fresh)) / 300
    assert 0.7 < inside <= 1.0  # same distribution: mostly inside the manifold
    assert not any(manifold_precision_flags(reference, radii, fresh + 20.0))


def test_manifold_distance_on_a_lattice_is_the_kth_neighbour_over_the_reference_spacing():
    # Reference: the integers 0..99 on a line. Every one's 2nd nearest other point is 1 away
    # (0 and 99 included: 2 away is their 2nd; the median is 1), so distances are in lattice units.
    reference = torch.arange(100, dtype=torch.float64)[:, None]
    radii = neighbour_radii(reference, k=2)
    assert float(radii.median()) == 1.0
    generated = torch.tensor([[10.5], [-5.0], [200.0], [42.0]], dtype=torch.float64)
    # 10.5: neighbours 10 and 11 at 0.5 each; -5: 0 at 5, 1 at 6; 200: 99 at 101, 98 at 102;
    # 42 (on the lattice): itself at 0, then 41 and 43 at 1.
    assert manifold_distances(reference, radii, generated, k=2).tolist() == [0.5, 6.0, 102.0, 1.0]


def test_manifold_distance_is_about_one_for_the_reference_distribution_and_grows_off_it():
    generator = torch.Generator().manual_seed(4)
    reference = torch.randn(2000, 8, generator=generator, dtype=torch.float64)
    radii = neighbour_radii(reference, k=5)
    fresh = torch.randn(500, 8, generator=generator, dtype=torch.float64)
    near = float(manifold_distances(reference, radii, fresh, k=5).mean())
    assert 0.8 < near < 1.25
    assert float(manifold_distances(reference, radii, fresh * 2.0, k=5).mean()) > 1.8 * near  # 2.2 measured


def test_fid_and_kid_on_features_are_zero_for_one_distribution_and_grow_with_a_shift():
    generator = torch.Generator().manual_seed(2)
    reference = torch.randn(4000, 4, generator=generator, dtype=torch.float64)
    same = torch.randn(2000, 4, generator=generator, dtype=torch.float64)
    assert frechet_distance(reference, same) < 0.02
    assert frechet_distance(reference, same + 1.0) > 3.5  # ||mu shift||^2 = 4
    kid, _ = kernel_distance(reference, same[:200], seed=0)
    shifted, _ = kernel_distance(reference, same[:200] + 1.0, seed=0)
    assert abs(kid) < 0.05 < shifted
    assert kernel_distance(reference, same[:200], seed=3) == kernel_distance(reference, same[:200], seed=3)


def test_reference_features_are_cached_and_a_damaged_cache_is_recomputed(monkeypatch, tmp_path):
    monkeypatch.setenv("UNRELEARN_CACHE", str(tmp_path))
    world, detector = get_world("shapes"), load_detector("shapes")
    _REFERENCE_CACHE.clear()
    first = reference_features(world, "circle", detector, count=300)
    radii = reference_radii(world, "circle", detector, count=300)
    (cached,) = (tmp_path / "reference-features").glob("shapes-circle-*.safetensors")
    assert first.shape == (300, 64) and radii.shape == (300,)
    cached.write_bytes(b"damaged")
    _REFERENCE_CACHE.clear()
    again = reference_features(world, "circle", detector, count=300)
    assert torch.equal(first, again) and cached.stat().st_size > 1000
    _REFERENCE_CACHE.clear()
    assert torch.equal(reference_radii(world, "circle", detector, count=300), radii)  # read back from disk


def test_more_quality_samples_change_only_the_quality_metrics(tiny_model):
    """Extra retain generations feed precision, FID and KID; forget rate and retain
    alignment stay those of the first ``samples``."""
    from unrelearn.evaluate import EvalConfig, evaluate

    plain = evaluate(tiny_model, "circle", EvalConfig(samples=4, steps=2), progress=False).metrics
    more = evaluate(tiny_model, "circle", EvalConfig(samples=4, steps=2, quality_samples=10), progress=False).metrics
    assert (plain["quality_samples"], more["quality_samples"]) == (4, 10)
    for key in ("forget_rate", "forget_rate_ci", "retain_alignment", "retain_alignment_ci"):
        assert plain[key] == more[key], key
    assert plain["fid"] != more["fid"]


def test_evaluations_at_different_seeds_draw_independent_quality_images(tiny_model, monkeypatch):
    """The seed-to-seed spread of a quality metric is only honest if two seeds' evaluations score
    independent images: no generator seed may feed the quality images (retain and extra
    generations) of two seeds; the extras once used seed + 3, seed + 2's retain stream. (Seed
    S + 1's forget generations do share S's retain noise, under other prompts and another
    metric; changing that would change every stored forget rate.)"""
    import itertools

    from unrelearn.evaluate import EvalConfig, evaluate

    calls: list[int] = []
    sample = type(tiny_model).sample

    def recording_sample(self, prompts, *args, seed=0, **kwargs):
        calls.append(seed)
        return sample(self, prompts, *args, seed=seed, **kwargs)

    monkeypatch.setattr(type(tiny_model), "sample", recording_sample)
    quality_streams, forget_streams = {}, {}
    for seed in range(4):
        calls.clear()
        evaluate(tiny_model, "circle", EvalConfig(samples=2, steps=1, quality_samples=4, seed=seed), progress=False)
        assert len(calls) == 3, calls  # forget, retain, extra quality generations
        forget_streams[seed], quality_streams[seed] = calls[0], set(calls[1:])
    assert len(set(forget_streams.values())) == 4
    for a, b in itertools.combinations(quality_streams.values(), 2):
        assert not a & b, quality_streams



def test_fid_over_unlearning_seeds_is_the_mean_of_runs_with_its_t_interval(tmp_path, monkeypatch, capsys):
    """benchmarks/fid_unlearn_seeds.py: each run's FID is the mean over its evaluation seeds;
    the interval is Student's t over runs (hand-computed: runs 1, 2, 3 -> 2 +- 4.3027 / sqrt 3)."""
    import importlib.util
    import json
    from pathlib import Path

    import pytest
    from scipy import stats

    path = Path(__file__).parents[1] / "benchmarks" / "fid_unlearn_seeds.py"
    spec = importlib.util.spec_from_file_location("fid_unlearn_seeds", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for run, fids in enumerate([[0.5, 1.5], [2.0, 2.0], [2.5, 3.5]]):
        (tmp_path / f"m-s{run}.json").write_text(json.dumps({"model": f"m{run}", "by_samples": {"512": {"fid": fids}}}))
    out = tmp_path / "summary"
    monkeypatch.setattr("sys.argv", ["x", "--group", f"m={tmp_path}/m-s*.json", "--out", str(out)])
    script.main()
    row = json.loads(out.with_suffix(".json").read_text())["rows"][0]
    assert [r["value"] for r in row["runs"]] == [1.0, 2.0, 3.0]
    half = 4.302652729911275 / 3**0.5
    assert abs(row["mean"] - 2.0) < 1e-12
    assert abs(row["ci95"][0] - (2.0 - half)) < 1e-9 and abs(row["ci95"][1] - (2.0 + half)) < 1e-9
    monkeypatch.setattr("sys.argv", ["x", "--group", f"m={tmp_path}/m-s0.json"])
    with pytest.raises(SystemExit, match="an interval needs 2 or more"):
        script.main()
    # Welch by hand: A = 1, 2, 3 and B = 2, 4, 6: difference 2, se^2 = 1/3 + 4/3, df = (5/3)^2 / (17/18)
    for run, fid in enumerate([2.0, 4.0, 6.0]):
        (tmp_path / f"n-s{run}.json").write_text(json.dumps({"model": f"n{run}", "by_samples": {"512": {"fid": [fid]}}}))
    argv = ["x", "--group", f"m={tmp_path}/m-s*.json", "--group", f"n={tmp_path}/n-s*.json", "--compare", "m,n"]
    monkeypatch.setattr("sys.argv", [*argv, "--out", str(out)])
    script.main()
    (comparison,) = json.loads(out.with_suffix(".json").read_text())["comparisons"]
    half = stats.t.ppf(0.975, (5 / 3) ** 2 / (17 / 18)) * (5 / 3) ** 0.5
    assert abs(comparison["difference"] - 2.0) < 1e-12
    assert abs(comparison["ci95"][0] - (2.0 - half)) < 1e-9 and abs(comparison["ci95"][1] - (2.0 + half)) < 1e-9
    for run, rate in enumerate([0.0, 0.25, 0.5]):
        (tmp_path / f"r-s{run}.eval.json").write_text(json.dumps({"model": f"r{run}", "forget_rate": rate}))
    monkeypatch.setattr("sys.argv", ["x", "--metric", "forget_rate", "--group", f"r={tmp_path}/r-s*.eval.json",
                                     "--out", str(out)])  # fmt: skip
    script.main()
    (rates,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["value"] for r in rates["runs"]] == [0.0, 0.25, 0.5] and abs(rates["mean"] - 0.25) < 1e-12
    # Every run at the same value (all at AR 0): no interval (not scipy's NaN, nor the point as if certain).
    for run in range(3):
        (tmp_path / f"z-s{run}.eval.json").write_text(json.dumps({"model": f"z{run}", "forget_rate": 0.0}))
    monkeypatch.setattr("sys.argv", ["x", "--metric", "forget_rate", "--group", f"z={tmp_path}/z-s*.eval.json",
                                     "--out", str(out)])  # fmt: skip
    script.main()
    assert json.loads(out.with_suffix(".json").read_text())["rows"][0]["ci95"] is None
    assert "| z | 3 | 0, 0, 0 | 0 (no interval: every run at one value) |" in out.with_suffix(".md").read_text()
    # Two groups without spread (every run at AR 0 against every run at 1/256): no between-run variance to
    # test, so no interval and no p (Welch's test would give p = 0 and a zero-width interval).
    for run in range(3):
        (tmp_path / f"q-s{run}.eval.json").write_text(json.dumps({"model": f"q{run}", "forget_rate": 1 / 256}))
    monkeypatch.setattr("sys.argv", ["x", "--metric", "forget_rate", "--group", f"z={tmp_path}/z-s*.eval.json", "--group",
                                     f"q={tmp_path}/q-s*.eval.json", "--compare", "q,z", "--pool", "q,z", "--out", str(out)])  # fmt: skip
    script.main()
    for flat in json.loads(out.with_suffix(".json").read_text())["comparisons"]:
        assert (flat["difference"], flat["ci95"], flat["p"]) == (-1 / 256, None, None)
    assert "(no interval: every run of each group at one value) | n/a |" in out.with_suffix(".md").read_text()
    monkeypatch.setattr("sys.argv", [*argv[:-1], "m,z"])
    with pytest.raises(SystemExit, match="give two group labels"):
        script.main()
    # Pooled over classes: one pair is Welch's comparison itself; two pairs by hand. With
    # (m, n) and (n, m): differences +2 and -2, mean 0; variance (1/3 + 4/3) * 2 / 4 = 5/6,
    # df = (5/6)^2 / (2 * ((1/12)^2 + (1/3)^2) / 2) = (25/36) / (17/144).
    monkeypatch.setattr("sys.argv", [*argv[:-2], "--pool", "m,n", "--pool", "m,n;n,m", "--out", str(out)])
    script.main()
    one, two = json.loads(out.with_suffix(".json").read_text())["comparisons"]
    assert abs(one["difference"] - comparison["difference"]) < 1e-12 and abs(one["p"] - comparison["p"]) < 1e-9
    assert all(abs(x - y) < 1e-9 for x, y in zip(one["ci95"], comparison["ci95"]))
    assert abs(two["difference"]) < 1e-12 and abs(two["df"] - (25 / 36) / (17 / 144)) < 1e-9
    half = stats.t.ppf(0.975, (25 / 36) / (17 / 144)) * (5 / 6) ** 0.5
    assert abs(two["ci95"][1] - half) < 1e-9 and abs(two["p"] - 1.0) < 1e-12
    monkeypatch.setattr("sys.argv", [*argv[:-2], "--pool", "m,n;m"])
    with pytest.raises(SystemExit, match="give pairs A,B"):
        script.main()
