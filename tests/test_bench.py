"""The benchmark: grid expansion, the results store, resuming after a kill, shards, the report."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from unrelearn.bench.grid import expand, load_preset, parse_shard, preset_names, shard
from unrelearn.bench.report import write_report
from unrelearn.bench.run import durability_summary, list_bench, run_bench
from unrelearn.bench.store import CellResult, ResultStore
from unrelearn.errors import UnrelearnError

TINY = {
    "description": "test grid",
    "model": "builtin:shapes",
    "concepts": ["circle"],
    "oracle": "builtin:shapes-oracle-{concept}",
    "contenders": [{"label": "uce", "method": "uce"}],
    "attacks": [{"data": ["hrm-m", "clean"], "steps": 3, "lr": 1e-4, "batch_size": 2, "data_size": 8, "eval_at": [0, 3]}],
    "seeds": [0],
    "eval": {"samples": 4, "steps": 2},
}
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def write_preset(folder: Path, preset: dict) -> Path:
    path = folder / "preset.json"
    path.write_text(json.dumps(preset))
    return path


def bench_command(preset: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "unrelearn.cli", "bench", "--preset", str(preset), "--out", str(out), *extra]


def rows(folder: Path) -> dict[str, tuple]:
    """Everything a result is made of, per cell (not where or how long it ran)."""
    store = ResultStore(folder / "results.sqlite")
    try:
        return {c.key: (c.spec, c.summary, c.points) for c in store.cells()}
    finally:
        store.close()


def test_presets_expand_to_checked_cells():
    assert {"quick", "table1", "durability", "resalign", "dimra", "adaptive"} <= set(preset_names())
    for name in preset_names():
        preset = load_preset(name)
        if preset.get("model", "builtin:shapes") is None:  # a Stable Diffusion preset: the user's folder
            with pytest.raises(UnrelearnError, match="pass --model FOLDER"):
                expand(preset)
            preset = preset | {"model": "/data/stable-diffusion-v1-4"}
        cells = expand(preset)
        assert cells and len({c.key for c in cells}) == len(cells)
    grid = TINY | {"attacks": [{"data": ["hrm-m", "clean"], "lr": [1e-5, 1e-4], "mode": ["full", "lora"], "steps": 10}],
                   "seeds": [0, 1]}  # fmt: skip
    cells = expand(grid)
    # 2 contenders (uce, the shipped oracle) x 2 data x 2 lrs x 2 modes x 2 seeds
    assert len(cells) == 2 * 2 * 2 * 2 * 2
    assert {c.attack["lr"] for c in cells} == {1e-5, 1e-4} and {c.seed for c in cells} == {0, 1}
    assert sum(c.contender.oracle for c in cells) == 16
    # lora_targets is a list by type: a plain list is one value, a list of lists an axis.
    one = expand(TINY | {"attacks": [{"steps": 10, "lora_targets": ["to_q", "to_v"]}]})
    two = expand(TINY | {"attacks": [{"steps": 10, "lora_targets": [["to_q"], ["to_v"]]}]})
    assert len(two) == 2 * len(one)


DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("path", sorted(p for p in DOCS.rglob("*.json") if '"contenders"' in p.read_text()),
                         ids=lambda p: str(p.relative_to(DOCS)))  # fmt: skip
def test_the_presets_the_docs_quote_still_expand(path):
    """docs/ tells readers to run these files; a renamed option or method must break here, not for them."""
    cells = expand(load_preset(str(path)))
    assert cells and len({c.key for c in cells}) == len(cells)


def test_an_attack_entry_can_attack_some_contenders_only():
    grid = TINY | {"contenders": [{"label": "uce", "method": "uce"}, {"label": "esd", "method": "esd-u-1"}],
                   "attacks": [{"data": "hrm-m", "steps": 10},
                               {"data": "clean", "steps": 10, "lr": 1e-3, "contenders": ["esd", "oracle"]}]}  # fmt: skip
    cells = expand(grid)
    by_attack = {(c.attack["data"], c.contender.label) for c in cells}
    assert by_attack == {("hrm-m", "uce"), ("hrm-m", "esd"), ("hrm-m", "oracle"), ("clean", "esd"), ("clean", "oracle")}
    # The restricted entry's cells are the same cells an unrestricted preset has.
    everyone = expand(grid | {"attacks": [grid["attacks"][1] | {"contenders": ["uce", "esd", "oracle"]}]})
    assert {c.key for c in cells if c.attack["data"] == "clean"} < {c.key for c in everyone}
    with pytest.raises(UnrelearnError, match="unknown contender.*sdd"):
        expand(grid | {"attacks": [{"steps": 10, "contenders": ["sdd"]}]})


def test_a_cell_key_names_what_changes_its_result_not_its_label():
    relabelled = TINY | {"contenders": [{"label": "renamed", "method": "uce"}]}
    assert {c.key for c in expand(TINY)} == {c.key for c in expand(relabelled)}
    other_option = TINY | {"contenders": [{"label": "uce", "method": "uce", "options": {"seed": 1}}]}
    assert {c.key for c in expand(TINY)} != {c.key for c in expand(other_option)}


def test_shards_are_disjoint_and_cover_the_grid():
    cells = expand(TINY | {"seeds": [0, 1, 2]})
    parts = [shard(cells, i, 4) for i in range(4)]
    keys = [c.key for part in parts for c in part]
    assert sorted(keys) == sorted(c.key for c in cells) and len(set(keys)) == len(keys)
    assert parse_shard("2/4") == (1, 4) and parse_shard(None) == (0, 1)
    for bad in ("0/4", "5/4", "a/b", "3"):
        with pytest.raises(UnrelearnError, match="--shard"):
            parse_shard(bad)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attacks": [{"steps": 3, "learning_rate": 1e-4}]}, "unknown field"),
        ({"attacks": [{"steps": 3, "lr": -1.0}]}, "lr"),
        ({"attacks": [{"steps": 3, "eval_at": [0, 5]}]}, "eval_at"),
        ({"contenders": [{"method": "esd-u-9x"}]}, "unknown method"),
        ({"contenders": [{"method": "uce", "options": {"no_such": 1}}]}, "no_such"),
        ({"concepts": []}, "names no concepts"),
        ({"eval": {"samples": 1}}, "samples"),
        ({"frobnicate": 1}, "unknown field"),
    ],
)
def test_bad_presets_fail_before_any_work_with_one_line(change, message):
    with pytest.raises(UnrelearnError, match=message):
        expand(TINY | change)


def test_store_keeps_every_row_of_concurrent_writers(tmp_path):
    """Eight threads, each with its own connection, write 25 cells each at once: none is lost."""
    ResultStore(tmp_path / "results.sqlite").close()
    point = {"step": 0, "forget_rate": 0.5, "forget_rate_ci": [0.4, 0.6], "retain_alignment": 0.9,
             "retain_alignment_ci": [0.8, 1.0], "fid": 1.0,
                   "precision": 0.7, "precision_ci": [0.6, 0.8], "kid": 0.1, "kid_std": 0.01}  # fmt: skip

    def writer(worker: int) -> None:
        store = ResultStore(tmp_path / "results.sqlite")
        for i in range(25):
            store.add_cell(CellResult(f"{worker}-{i}", "c", "m", "a", 0, {}, {"n": i}, [point], 0.0, "h"))
        store.close()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = ResultStore(tmp_path / "results.sqlite")
    assert len(store.finished_keys()) == 200 and len(store.cells()) == 200
    assert [what for _, what in store.events()].count("finished") == 200


def test_a_store_of_another_schema_or_not_a_database_is_refused(tmp_path):
    (tmp_path / "junk.sqlite").write_text("not a database, just text " * 100)
    with pytest.raises(UnrelearnError, match="not a usable results store"):
        ResultStore(tmp_path / "junk.sqlite")
    ResultStore(tmp_path / "old.sqlite").close()
    with sqlite3.connect(tmp_path / "old.sqlite") as db:
        db.execute("UPDATE meta SET value = '0' WHERE name = 'schema'")
    with pytest.raises(UnrelearnError, match="schema 0"):
        ResultStore(tmp_path / "old.sqlite")


def test_a_schema_3_store_is_migrated_with_its_rows(tmp_path):
    """Schema 4 only lets the quality columns be NULL, schema 5 adds the alternative rate, schema 6
    the manifold distance; a store written by schema 3 (benchmarks in progress) keeps its rows and
    takes rows without quality metrics afterwards."""
    from unrelearn.bench import store as store_module

    path = tmp_path / "results.sqlite"
    schema3 = store_module._SCHEMA.replace("    alternative_rate REAL,\n    alternative_low REAL,\n    alternative_high REAL,\n", "")
    schema3 = schema3.replace("    manifold_distance REAL,\n    manifold_low REAL,\n    manifold_high REAL,\n", "")
    assert "alternative" not in schema3 and "manifold" not in schema3
    for column in store_module._QUALITY_COLUMNS:
        schema3 = schema3.replace(f"    {column} REAL,", f"    {column} REAL NOT NULL,")
    assert schema3.count("NOT NULL") == store_module._SCHEMA.count("NOT NULL") + len(store_module._QUALITY_COLUMNS)
    with sqlite3.connect(path) as db:
        db.executescript(schema3)
        db.execute("INSERT INTO meta VALUES ('schema', '3')")
        db.execute("INSERT INTO cells VALUES ('old', 'circle', 'esd', 'hrm-m', 0, '{}', '{}', 1.0, 'h', 0)")
        db.execute("INSERT INTO points VALUES ('old', 0, 0.5, 0.4, 0.6, 0.9, 0.8, 1.0, 0.7, 0.6, 0.8, 12.0, 0.01, 0.002)")
    store = ResultStore(path)

    def point_of(key):
        return next(c for c in store.cells() if c.key == key).points[0]

    assert point_of("old")["fid"] == 12.0 and point_of("old")["forget_rate"] == 0.5
    assert point_of("old")["alternative_rate"] is None and point_of("old")["manifold_distance"] is None
    point = {"step": 0, "forget_rate": 0.25, "forget_rate_ci": [0.1, 0.4], "retain_alignment": None,
             "retain_alignment_ci": [None, None], "precision": None, "precision_ci": [None, None], "fid": None, "kid": None,
             "kid_std": None}  # fmt: skip
    store.add_cell(CellResult("new", "nudity", "esd", "hrm-m", 0, {}, {}, [point], 1.0, "h"))
    assert point_of("new")["fid"] is None and point_of("new")["forget_rate"] == 0.25 and point_of("old")["kid"] == 0.01
    point |= {"alternative_rate": 0.75, "alternative_rate_ci": [0.6, 0.9]}
    store.add_cell(CellResult("digits", "seven", "dimum", "dimra-aux", 0, {}, {}, [point], 1.0, "h"))
    assert point_of("digits")["alternative_rate"] == 0.75 and point_of("digits")["alternative_rate_ci"] == [0.6, 0.9]
    point |= {"manifold_distance": 1.5, "manifold_distance_ci": [1.4, 1.6]}
    store.add_cell(CellResult("shapes", "circle", "esd", "hrm-m", 0, {}, {}, [point], 1.0, "h"))
    assert point_of("shapes")["manifold_distance"] == 1.5 and point_of("shapes")["manifold_distance_ci"] == [1.4, 1.6]
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()[0] == "6"


def test_a_schema_5_store_gains_the_manifold_distance_and_keeps_its_rows(tmp_path):
    """The committed benchmark folders were written by schema 5: opened by schema 6 their rows
    read as before, with no manifold distance (not measured then)."""
    from unrelearn.bench import store as store_module

    path = tmp_path / "results.sqlite"
    schema5 = store_module._SCHEMA.replace("    manifold_distance REAL,\n    manifold_low REAL,\n    manifold_high REAL,\n", "")
    assert "manifold" not in schema5
    with sqlite3.connect(path) as db:
        db.executescript(schema5)
        db.execute("INSERT INTO meta VALUES ('schema', '5')")
        db.execute("INSERT INTO cells VALUES ('old', 'circle', 'esd', 'hrm-m', 0, '{}', '{}', 1.0, 'h', 0)")
        db.execute("INSERT INTO points VALUES ('old', 0, 0.5, 0.4, 0.6, 0.9, 0.8, 1.0, 0.7, 0.6, 0.8, 12.0, 0.01, 0.002, "
                   "0.25, 0.1, 0.4)")  # fmt: skip
    store = ResultStore(path)
    (point,) = store.cells()[0].points
    assert point["fid"] == 12.0 and point["alternative_rate_ci"] == [0.1, 0.4]
    assert point["manifold_distance"] is None and point["manifold_distance_ci"] == [None, None]
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()[0] == "6"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The tiny grid run start to finish by one process."""
    folder = tmp_path_factory.mktemp("bench")
    preset = write_preset(folder, TINY)
    done = subprocess.run(bench_command(preset, folder / "one"), env=ENV, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "4 cells: 0 finished before, 4 computed now" in done.stdout
    return preset, folder / "one"


def test_a_killed_benchmark_recomputes_no_finished_cell_and_loses_no_row(uninterrupted, tmp_path):
    preset, straight = uninterrupted
    out = tmp_path / "killed"
    process = subprocess.Popen(bench_command(preset, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    finished_before: set[str] = set()
    while process.poll() is None and time.monotonic() < deadline and len(finished_before) < 2:
        time.sleep(0.2)
        if (out / "results.sqlite").is_file():
            with sqlite3.connect(out / "results.sqlite", timeout=30) as db:
                finished_before = {k for (k,) in db.execute("SELECT key FROM cells")} if _has_cells(db) else set()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the benchmark finished before it could be killed"
    assert 2 <= len(finished_before) < 4

    again = subprocess.run(bench_command(preset, out), env=ENV, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stderr
    store = ResultStore(out / "results.sqlite")
    events = store.events()
    store.close()
    for key in finished_before:
        assert [what for cell, what in events if cell == key] == ["started", "finished"], "a finished cell ran again"
    assert sorted(cell for cell, what in events if what == "finished") == sorted(rows(straight))
    assert rows(out) == rows(straight)


def _has_cells(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'cells'").fetchone() is not None


def test_two_shards_at_once_give_the_results_of_one_process(uninterrupted, tmp_path):
    preset, straight = uninterrupted
    out = tmp_path / "sharded"
    shards = [subprocess.Popen(bench_command(preset, out, "--shard", f"{i}/2"), env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for i in (1, 2)]  # fmt: skip
    outputs = [p.communicate(timeout=600) for p in shards]
    assert all(p.returncode == 0 for p in shards), [err for _, err in outputs]
    assert rows(out) == rows(straight)
    # Each shard computed its own half: no cell was started twice.
    store = ResultStore(out / "results.sqlite")
    started = [cell for cell, what in store.events() if what == "started"]
    store.close()
    assert len(started) == len(set(started)) == 4
    # Run again: nothing left to do.
    again = subprocess.run(bench_command(preset, out), env=ENV, capture_output=True, text=True, check=False)
    assert "4 finished before, 0 computed now" in again.stdout


def test_the_report_shows_the_stored_numbers_tables_and_images(uninterrupted, tmp_path):
    _, folder = uninterrupted
    written = write_report(folder, tmp_path / "report")
    markdown, page = written["markdown"].read_text(), written["html"].read_text()
    store = ResultStore(folder / "results.sqlite")
    cells = store.cells()
    store.close()
    for cell in cells:
        first = cell.points[0]
        lo, hi = first["forget_rate_ci"]
        assert f"{first['forget_rate']:.3f} [{lo:.3f}, {hi:.3f}]" in markdown
        assert cell.attack in markdown and cell.key in page
    assert "Worst case over attack settings" in markdown and "| oracle |" in markdown
    # Every number with its interval: the worst-case table's alignment before the attack too.
    worst = markdown.split("#### Worst case over attack settings")[1].split("####")[0]
    start = next(p for p in cells[0].points if p["step"] == 0)
    alignment = f"{start['retain_alignment']:.3f} [{start['retain_alignment_ci'][0]:.3f}, {start['retain_alignment_ci'][1]:.3f}] |"
    assert "retain alignment before [95% CI]" in worst and alignment in worst
    # A new store measures the manifold distance at every evaluated step; the report shows it.
    distance = f"{start['manifold_distance']:.3f} [{start['manifold_distance_ci'][0]:.3f}, {start['manifold_distance_ci'][1]:.3f}]"
    assert all(p["manifold_distance"] is not None for cell in cells for p in cell.points)
    assert "manifold distance [95% CI]" in markdown and distance in markdown and "manifold distance (last)" in markdown
    # Self-contained: every image inline, no file reference left in the page.
    assert page.count("<table>") >= 4 and page.count('src="data:image/png;base64,') >= 7
    assert 'src="' not in page.replace('src="data:image/png;base64,', "")
    for link in [line.split("](")[1].rstrip(")") for line in markdown.splitlines() if line.startswith("![")]:
        assert (tmp_path / "report" / link).is_file()


def test_list_groups_cells_by_contender_and_counts_the_finished_ones(uninterrupted, tmp_path):
    preset, finished = uninterrupted
    fresh = list_bench(str(preset), tmp_path / "nothing-run")
    body = [line.split(None, 2) for line in fresh[:-3]]
    assert [status for _, status, _ in body] == ["pending"] * 4
    # The preset's order (uce, then the oracle), attacks alphabetical within a contender.
    assert [what.split(" | ")[1:3] for _, _, what in body] == [
        ["uce", "clean full adam lr=0.0001 3 steps"], ["uce", "hrm-m full adam lr=0.0001 3 steps"],
        ["oracle", "clean full adam lr=0.0001 3 steps"], ["oracle", "hrm-m full adam lr=0.0001 3 steps"],
    ]  # fmt: skip
    assert fresh[-3:] == ["finished by contender: uce 0/2, oracle 0/2", "4 cells, 0 finished",
                          "models the pending cells attack: 0 in this folder, 1 to unlearn"]  # fmt: skip
    done = list_bench(str(preset), finished)
    assert [line.split()[1] for line in done[:-2]] == ["done"] * 4
    assert done[-2:] == ["finished by contender: uce 2/2, oracle 2/2", "4 cells, 4 finished"]


def test_only_runs_the_named_contenders_first_and_records_the_whole_preset(uninterrupted, tmp_path):
    preset, straight = uninterrupted
    out = tmp_path / "parts"
    first = subprocess.run(bench_command(preset, out, "--only", "oracle", "--shard", "1/1"), env=ENV, capture_output=True,
                           text=True, check=False)  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert "4 cells: 0 finished before, 2 computed now" in first.stdout
    expected = rows(straight)
    assert {k: v for k, v in expected.items() if v[0]["oracle"]} == rows(out)
    store = ResultStore(out / "results.sqlite")
    (_, entry), = store.meta_items("preset:")
    store.close()
    # The recorded command makes the whole preset: the part one process ran is not a result.
    assert len(entry["cells"]) == 4 and "--only" not in entry["command"] and "--shard" not in entry["command"]
    rest = subprocess.run(bench_command(preset, out), env=ENV, capture_output=True, text=True, check=False)
    assert "4 cells: 2 finished before, 2 computed now" in rest.stdout and rows(out) == expected
    wrong = subprocess.run(bench_command(preset, out, "--only", "esd"), env=ENV, capture_output=True, text=True, check=False)
    assert wrong.returncode == 2 and "--only names contender(s) esd" in wrong.stderr and "Traceback" not in wrong.stderr


def test_a_committed_folder_without_its_weights_reports_and_resumes_in_a_clone(uninterrupted, tmp_path):
    """The .gitignore bench writes keeps weights and checkpoints out of a commit: a clone holds
    every result, draws the report, and a grown preset run in the clone unlearns the model whose
    weights stayed behind again, to the same weights, without recomputing a finished cell."""
    import shutil

    preset, straight = uninterrupted
    repo, clone = tmp_path / "repo", tmp_path / "clone"
    shutil.copytree(straight, repo / "bench")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "results"], check=True)
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    moved = clone / "bench"
    assert list(straight.rglob("*.safetensors")) and not list(moved.rglob("*.safetensors"))
    assert not list(moved.rglob(".*.lock")) and rows(moved) == rows(straight)
    # The same report wherever the folder lies, figure names included.
    report = write_report(moved, tmp_path / "clone-report")["markdown"].read_text()
    assert "| uce |" in report and report == write_report(straight, tmp_path / "first-report")["markdown"].read_text()

    grown = json.loads(preset.read_text())
    grown["attacks"].append(grown["attacks"][0] | {"data": "hrm-m", "lr": 3e-4})
    grown_path = write_preset(tmp_path, grown)
    assert list_bench(str(grown_path), moved)[-1] == "models the pending cells attack: 0 in this folder, 1 to unlearn " \
                                                      "(1 again: recorded here, their weights are not)"
    done = subprocess.run(bench_command(grown_path, moved), env=ENV, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "6 cells: 4 finished before, 2 computed now" in done.stdout
    assert "again: its weights are not in" in done.stderr and "warning" not in done.stderr
    store = ResultStore(moved / "results.sqlite")
    events = store.events()
    store.close()
    assert [what for _, what in events if what.startswith("unlearned again")] == ["unlearned again, same weights"]
    assert {k: v for k, v in rows(moved).items() if k in rows(straight)} == rows(straight)


def test_a_model_unlearned_again_to_other_weights_is_said(tmp_path, capsys):
    """Its finished cells attacked the first weights: a rerun that gets others must not pass silently."""
    from unrelearn.bench.grid import Contender
    from unrelearn.bench.run import _has_weights, _Runner
    from unrelearn.evaluate import EvalConfig

    store = ResultStore(tmp_path / "results.sqlite")
    contender = Contender("uce", "builtin:shapes", "uce")
    key = contender.key("circle")
    # Recorded on another machine, at a path that does not exist here.
    store.add_model(key, "circle", "uce", contender.identity("circle"), f"/elsewhere/models/{key}", {"weights_sha256": "0" * 64})
    runner = _Runner(store, tmp_path, "builtin:shapes", "cpu", keep_models=False, progress=False, machine="here")
    folder = runner.model(contender, "circle", EvalConfig(samples=4, steps=2))
    assert folder == tmp_path / "models" / key and _has_weights(folder)
    assert "uce on 'circle' unlearned again gave other weights than its first run" in capsys.readouterr().err
    assert [what.split(":")[0] for _, what in store.events()] == ["unlearned again, weights differ"]
    point = {"step": 0, "forget_rate": 0.1, "forget_rate_ci": [0.0, 0.2], "retain_alignment": None,
             "retain_alignment_ci": None, "precision": None, "precision_ci": None, "fid": None, "kid": None, "kid_std": None}  # fmt: skip
    store.add_cell(CellResult("c", "circle", "uce", "hrm-m", 0, {"contender": contender.identity("circle")},
                              durability_summary([point], 0.5) | {"reference_forget_rate": 1.0}, [point], 1.0, "h"))  # fmt: skip
    store.set_meta("preset:p", {"preset": {"contenders": [{"label": "uce"}]}, "cells": ["c"], "command": "by hand"})
    store.close()
    # The report says so too: the cells of that model attacked two versions of it.
    assert "to other weights than their first run's: uce on 'circle' unlearned again" in write_report(tmp_path)["markdown"].read_text()


def test_a_preset_run_as_a_part_of_another_shows_once(uninterrupted, tmp_path):
    import shutil

    _, original = uninterrupted
    folder = tmp_path / "bench"
    shutil.copytree(original, folder)
    store = ResultStore(folder / "results.sqlite")
    (name, entry), = store.meta_items("preset:")
    part = entry | {"cells": entry["cells"][:1], "preset": entry["preset"] | {"description": "the urgent part"}}
    store.set_meta("preset:part", part)
    store.close()
    markdown = write_report(folder, tmp_path / "report")["markdown"].read_text()
    assert f"Preset `{name}`" in markdown and "Preset `part`" not in markdown and "the urgent part" not in markdown


def test_a_stored_model_unlearned_under_other_defaults_is_refused():
    from dataclasses import asdict

    from unrelearn.bench.grid import Contender
    from unrelearn.bench.run import _check_settings
    from unrelearn.methods.base import resolve_config

    contender = Contender("meta:uce", "builtin:shapes", "meta:uce", {"inner_optimizer": "adam"})
    now = json.loads(json.dumps(asdict(resolve_config("meta:uce", "shapes", {"inner_optimizer": "adam"}))))
    assert now["steps"] == 100 and now["inner_optimizer"] == "adam"  # the embedded defaults, then the options
    _check_settings(contender, "circle", {"config": now}, "models/k")
    # An option added after the model was unlearned: absent from its record, not a difference.
    _check_settings(contender, "circle", {"config": {k: v for k, v in now.items() if k != "zeta"}}, "models/k")
    with pytest.raises(UnrelearnError, match=r"'meta:uce' on 'circle' in 'models/k'.*gamma2 0.3 then, 0.1 now"):
        _check_settings(contender, "circle", {"config": now | {"gamma2": 0.3}}, "models/k")


def test_bench_cli_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from unrelearn.cli import app

    for args, message in [
        (["bench", "--preset", "nope"], "unknown preset"),
        (["bench", "--preset", str(write_preset(tmp_path, TINY)), "--shard", "3/2"], "--shard"),
        (["bench", "--preset", "quick", "--oracle", "circle"], "CONCEPT=MODEL"),
        (["report", str(tmp_path / "nothing")], "results.sqlite"),
    ]:
        done = CliRunner().invoke(app, [*args, *(["--out", str(tmp_path / "o")] if args[0] == "bench" else [])])
        assert done.exit_code == 2 and done.output.count("\n") == 1 and message in done.output, done.output
    assert not (tmp_path / "o").exists()


COMMITTED_BENCH = Path(__file__).parents[1] / "docs" / "bench" / "shapes"


@pytest.mark.parametrize("preset", ["durability", "table1", "adaptive"])
def test_a_committed_report_is_what_its_committed_results_draw(preset, tmp_path):
    """docs/bench/shapes is a benchmark folder committed without its weights: each report in it,
    redrawn from its store elsewhere, is the committed text, so no number in it was edited by hand."""
    import shutil

    folder = shutil.copytree(COMMITTED_BENCH, tmp_path / "shapes", ignore=shutil.ignore_patterns(preset))
    redrawn = write_report(folder, tmp_path / preset, presets=[preset])["markdown"].read_text()
    assert redrawn == (COMMITTED_BENCH / preset / "report.md").read_text()


def test_the_committed_paper_shaped_table1_is_what_its_committed_results_draw(tmp_path):
    """docs/bench/shapes/table1/table.md, redrawn from a copy of the committed store alone: the same
    text but for the two paths of the command that drew it."""
    import shutil

    from unrelearn.bench.tables import write_table

    (tmp_path / "shapes").mkdir()
    shutil.copyfile(COMMITTED_BENCH / "results.sqlite", tmp_path / "shapes" / "results.sqlite")
    written = write_table("table1", tmp_path / "shapes", tmp_path / "table", presets=["table1"])
    redrawn = written["markdown"].read_text().replace(f"{tmp_path / 'table'}", "docs/bench/shapes/table1/table")
    assert redrawn.replace(f"{tmp_path / 'shapes'}", "docs/bench/shapes") == (COMMITTED_BENCH / "table1" / "table.md").read_text()


def test_the_report_renders_in_a_real_browser_with_its_tables_and_images(uninterrupted, tmp_path):
    """Debian's headless Chromium (installed by `make test` where missing) loads the page: every
    table is there and every image decodes."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "no Chromium: `make browser` installs Debian's package (apt-get install chromium)"
    _, folder = uninterrupted
    page = write_report(folder, tmp_path / "report")["html"]
    probe = """<script>window.addEventListener("load", () => {
      const images = [...document.images];
      document.body.setAttribute("data-probe", JSON.stringify({
        tables: document.querySelectorAll("table").length,
        rows: document.querySelectorAll("tbody tr").length,
        images: images.length,
        decoded: images.filter(i => i.complete && i.naturalWidth > 0).length}));
    });</script></body>"""
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", probe))
    done = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom",
         probed.as_uri()], capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    import html as html_lib
    import re

    found = re.search(r'data-probe="([^"]+)"', done.stdout)
    assert found, done.stdout[:2000]
    probe_result = json.loads(html_lib.unescape(found.group(1)))
    store = ResultStore(folder / "results.sqlite")
    cells = store.cells()
    store.close()
    assert probe_result["tables"] >= 4 and probe_result["rows"] >= 2 * len(cells)
    assert probe_result["images"] >= 7 and probe_result["decoded"] == probe_result["images"]


def test_the_report_averages_seeds_and_shows_their_range_and_the_worst_case(tmp_path):
    """A store filled by hand: two seeds of one setting and a second setting; the report's numbers
    follow from them (mean over seeds with the seeds' range; worst case over settings and seeds)."""

    def point(step, rate, alignment=0.9):
        return {"step": step, "forget_rate": rate, "forget_rate_ci": [rate - 0.1, rate + 0.1], "retain_alignment": alignment,
                "retain_alignment_ci": [alignment - 0.1, alignment + 0.1], "precision": 0.7, "precision_ci": [0.6, 0.8],
                "fid": 100.0, "kid": 0.01, "kid_std": 0.005}  # fmt: skip

    store = ResultStore(tmp_path / "results.sqlite")
    cells = []
    for key, label, attack, seed, rates, alignments in [
        ("a0", "esd", "hrm-m lr=1e-4", 0, (0.1, 0.5), (0.9, 0.9)),
        ("a1", "esd", "hrm-m lr=1e-4", 1, (0.1, 0.7), (0.9, 0.4)),  # 0.4 [0.3, 0.5]: not clearly below 0.45
        ("b0", "esd", "hrm-m lr=1e-3", 0, (0.1, 0.9), (0.9, 0.3)),  # the strongest attack also wrecks the model
        ("o0", "oracle", "hrm-m lr=1e-4", 0, (0.0, 0.2), (0.9, 0.9)),
        ("w0", "wrecked", "hrm-m lr=1e-4", 0, (0.0, 0.1), (0.3, 0.3)),  # below half the oracle's alignment
    ]:  # fmt: skip
        points = [point(0, rates[0], alignments[0]), point(100, rates[1], alignments[1])]
        summary = durability_summary(points, threshold=0.45) | {"reference_forget_rate": 0.9}
        oracle = label == "oracle"
        store.add_cell(CellResult(key, "circle", label, attack, seed, {"oracle": oracle}, summary, points, 1.0, "h"))
        cells.append(key)
    store.set_meta("preset:hand", {"preset": {"contenders": [{"label": "esd"}, {"label": "wrecked"}]}, "cells": cells,
                                   "command": "by hand"})  # fmt: skip
    store.close()
    markdown = write_report(tmp_path)["markdown"].read_text()
    assert "| esd | 0.600 [0.500, 0.700] |" in markdown.replace("0.100 [0.100, 0.100] | ", "")  # seeds 0.5, 0.7
    assert "forget rate, mean over seeds [0, 1] [range of the seeds]" in markdown
    # Columns: worst rate, where, retain alignment there, settings held, fastest relearn, alignment before.
    assert "| esd | 0.900 [0.800, 1.000] | hrm-m lr=1e-3, seed 0, step 100 | 0.300 [0.200, 0.400] | 0/3 | 100 | 0.900 [0.800, 1.000] |" in markdown
    assert "| oracle | 0.200 [0.100, 0.300] | hrm-m lr=1e-4, seed 0, step 100 | 0.900 [0.800, 1.000] | 1/1 | never | 0.900 [0.800, 1.000] |" in markdown
    # The lowest worst case belongs to a model that also lost the retained prompts: flagged, not praised.
    assert "| wrecked ✗ | 0.100 [0.000, 0.200] | hrm-m lr=1e-4, seed 0, step 100 | 0.300 [0.200, 0.400] | 1/1 | never | 0.300 [0.200, 0.400] |" in markdown
    assert "below 0.5 of the oracle's (0.900)" in markdown
    # While the model stays usable (not clearly below 0.5 x the oracle's 0.9): esd's worst is the
    # lr 1e-4 attack's 0.7 (alignment 0.4, but its interval reaches 0.45), not the 0.9 of the
    # attack that wrecked it (0.3 [0.2, 0.4]); the wrecked model never counts.
    usable = markdown.split("#### Worst case while the model stays usable")[1].split("####")[0]
    assert "lies entirely below 0.5 of the oracle's before any attack" in usable
    assert "| esd | 0.450 | 0.700 [0.600, 0.800] | hrm-m lr=1e-4, seed 1, step 100 | 0.400 [0.300, 0.500] |" in usable
    assert "| oracle | 0.450 | 0.200 [0.100, 0.300] | hrm-m lr=1e-4, seed 0, step 100 | 0.900 [0.800, 1.000] |" in usable
    assert "| wrecked | 0.450 | none | - | - |" in usable
    # AUC of 0.1 -> 0.5 and 0.1 -> 0.7 (trapezoids over 100 steps), averaged: (0.3 + 0.4) / 2, with the seeds' range
    assert "| 100, 100 | 0.350 [0.300, 0.400] |" in markdown


def test_each_preset_shows_the_grids_and_training_curves_of_its_own_models_only(tmp_path):
    """Presets sharing one folder share its models table; a preset's section draws only the models
    its cells attacked."""
    from PIL import Image

    from unrelearn.bench.grid import digest

    def point(step, rate):
        return {"step": step, "forget_rate": rate, "forget_rate_ci": [rate, rate], "retain_alignment": 0.9,
                "retain_alignment_ci": [0.8, 1.0], "precision": 0.7, "precision_ci": [0.6, 0.8], "fid": 100.0,
                "kid": 0.01, "kid_std": 0.005}  # fmt: skip

    store = ResultStore(tmp_path / "results.sqlite")
    (tmp_path / "grids").mkdir()
    for label, colour in [("meta:esd", "red"), ("meta:uce", "blue")]:
        contender = {"model": "builtin:shapes", "method": label, "options": {}, "concept": "circle"}
        key = digest(contender)
        folder = tmp_path / "models" / key
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(folder / "training.png")
        Image.new("RGB", (8, 8), colour).save(tmp_path / "grids" / f"model-{key}.png")
        store.add_model(key, "circle", label, contender, str(folder), {})
        points = [point(0, 0.1), point(100, 0.5)]
        summary = durability_summary(points, threshold=0.45) | {"reference_forget_rate": 0.9}
        store.add_cell(CellResult(f"cell-{label}", "circle", label, "hrm-m", 0, {"contender": contender}, summary, points, 1.0, "h"))
        store.set_meta(f"preset:only-{label}", {"preset": {"contenders": [{"label": label}]}, "cells": [f"cell-{label}"],
                                                  "command": "by hand"})  # fmt: skip
    store.close()
    markdown = write_report(tmp_path)["markdown"].read_text()
    esd, uce = markdown.split("## Environment and cost")[0].split("## Preset `only-meta:uce`")
    assert "meta:esd before the attack" in esd and "meta:esd: training curves" in esd
    assert "meta:uce before the attack" not in esd and "meta:uce: training curves" not in esd
    assert "meta:uce before the attack" in uce and "meta:esd" not in uce
    # One preset's own report: its section, its cells' cost, and the command that draws it.
    alone = write_report(tmp_path, tmp_path / "uce-only", presets=["only-meta:uce"])["markdown"].read_text()
    assert "## Preset `only-meta:uce`" in alone and "only-meta:esd" not in alone and "cell-meta:esd" not in alone
    assert "drawn by `unrelearn report DIR --preset only-meta:uce`" in alone and "`cell-meta:uce`" in alone
    with pytest.raises(UnrelearnError, match="holds no preset 'durability'; it holds only-meta:esd, only-meta:uce"):
        write_report(tmp_path, presets=["durability"])


SEARCH = TINY | {
    "attacks": [{"data": "hrm-m", "lr": [1e-4, 1e-3, 3e-3], "steps": 4, "batch_size": 2, "data_size": 8, "eval_at": [0, 2, 4]}],
}


def _curve(*rates_by_step):
    return [{"step": step, "forget_rate": rate} for step, rate in rates_by_step]


def test_halving_keeps_the_strongest_third_per_contender_and_counts_finished_cells_at_every_rung():
    from unrelearn.bench.search import Halving, Work, setting_key

    cells = expand(SEARCH | {"seeds": [0, 1]})  # 2 contenders x 3 lrs x 2 seeds
    search = Halving(cells, eta=3)
    work, states = search.plan({}, {})
    assert sorted(w.cell.key for w in work) == sorted(c.key for c in cells) and {w.stop_at for w in work} == {2}
    assert [s.candidates for s in states] == [[3], [3]] and not any(s.complete for s in states)

    # Step-2 results: lr 1e-3 is strongest for uce (mean over seeds of each seed's highest so far);
    # for the oracle the seeds disagree and the mean decides. One uce cell finished by a full grid
    # counts at the rung without a partial.
    rate = {("uce", 1e-4): (0.2, 0.2), ("uce", 1e-3): (0.9, 0.5), ("uce", 3e-3): (0.6, 0.6),
            ("oracle", 1e-4): (0.0, 0.5), ("oracle", 1e-3): (0.1, 0.1), ("oracle", 3e-3): (0.3, 0.1)}  # fmt: skip
    partials, finished = {}, {}
    for c in cells:
        r = rate[(c.contender.label, c.attack["lr"])][c.seed]
        if (c.contender.label, c.attack["lr"], c.seed) == ("uce", 1e-4, 0):
            finished[c.key] = _curve((0, 0.0), (2, r), (4, 1.0))  # its step 4 must not count at the rung
        else:
            partials[(c.key, 2)] = _curve((0, 0.0), (2, r))
    work, states = search.plan(finished, partials)
    survivors = {(w.cell.contender.label, w.cell.attack["lr"]) for w in work}
    assert survivors == {("uce", 1e-3), ("oracle", 1e-4)} and {w.stop_at for w in work} == {None}
    assert len(work) == 4  # both seeds of each survivor
    by_contender = {s.contender: s for s in states}
    assert by_contender["uce"].candidates == [3, 1]
    pruned = {(p.setting.split(" lr=")[1].split()[0], round(p.score, 3)) for p in by_contender["uce"].pruned}
    assert pruned == {("0.003", 0.6), ("0.0001", 0.2)}

    # Once the survivors are finished the search is complete; eta 1 prunes nothing.
    finished |= {w.cell.key: partials[(w.cell.key, 2)] + _curve((4, 0.9)) for w in work}
    work, states = search.plan(finished, partials)
    assert work == [] and all(s.complete for s in states)
    assert {w.stop_at for w in Halving(cells, eta=1).plan({}, {})[0]} == {None}
    assert isinstance(Work(cells[0], None).cell, type(cells[0])) and setting_key(cells[0]) != cells[0].key
    # With intervals: a setting whose interval reaches the weakest survivor's rate is not clearly
    # weaker and continues (ranking on noise prunes at random); one wholly below it stops.
    one_seed = expand(SEARCH)
    by_lr = {1e-4: (0.3, 0.2, 0.4), 1e-3: (0.2, 0.1, 0.35), 3e-3: (0.1, 0.0, 0.2)}
    noisy = {(c.key, 2): [{"step": 2, "forget_rate": by_lr[c.attack["lr"]][0], "forget_rate_ci": list(by_lr[c.attack["lr"]][1:])}]
             for c in one_seed}  # fmt: skip
    work, states = Halving(one_seed, eta=3).plan({}, noisy)
    assert {w.cell.attack["lr"] for w in work} == {1e-4, 1e-3} and [s.candidates for s in states] == [[3, 2], [3, 2]]
    assert Halving(one_seed, eta=3).cost(states)[0][0] == 2 * (3 * 2 + 2 * 2)
    # Once the strongest setting has brought the concept back as often as the original model drew
    # it (the ceiling), the worst case is settled: strict halving, ties near the top do not all run on.
    work, states = Halving(one_seed, eta=3).plan({}, noisy, ceilings={"circle": 0.3})
    assert {w.cell.attack["lr"] for w in work} == {1e-4} and [s.candidates for s in states] == [[3, 1], [3, 1]]
    work, _ = Halving(one_seed, eta=3).plan({}, noisy, ceilings={"circle": 0.31})
    assert {w.cell.attack["lr"] for w in work} == {1e-4, 1e-3}

    # Per contender: 3 settings x 2 seeds to step 2 (one evaluation each), 1 x 2 from 2 to 4.
    assert search.cost() == ((2 * (3 * 2 * 2 + 1 * 2 * 2), 2 * (3 * 2 + 1 * 2)), (12 * 4, 12 * 2))
    assert Halving(cells, eta=1).cost() == ((48, 24), (48, 24))
    with pytest.raises(UnrelearnError, match="--halving"):
        Halving(cells, eta=0)


def test_the_worst_case_by_attack_data_counts_the_attacks_a_search_stopped():
    """A search over every setting at once prunes benign data early (malicious data relearns
    faster): the report still gives each data's highest rate, and says how far that attack ran."""
    from unrelearn.bench.grid import contender_rank
    from unrelearn.bench.report import Table, _attacks_ran, _by_data_blocks, _usable_blocks
    from unrelearn.bench.search import GroupState, Pruned

    preset = TINY | {"name": "p", "attacks": [{"data": ["hrm-m", "clean"], "steps": 4, "lr": 1e-4, "eval_at": [0, 2, 4]}]}
    cells = {(c.contender.label, c.attack["data"]): c for c in expand(preset)}

    def point(step, rate, alignment=0.9):
        return {"step": step, "forget_rate": rate, "forget_rate_ci": [rate / 2, min(1.0, 2 * rate)],
                "retain_alignment": alignment, "retain_alignment_ci": [alignment, alignment]}  # fmt: skip

    def finished(label, data, points, **summary):
        cell = cells[(label, data)]
        return CellResult(cell.key, "circle", label, cell.attack_label, 0, cell.spec(), summary, points, 1.0, "here")

    # uce relearns under malicious data only by wrecking itself (retain alignment 0.2, 0.3).
    done = [finished("uce", "hrm-m", [point(0, 0.1), point(2, 0.9, 0.2), point(4, 0.8, 0.3)]),
            finished("oracle", "hrm-m", [point(0, 0.02)], diverged_at=1)]  # fmt: skip
    partials = {(cells[("uce", "clean")].key, 2): [point(0, 0.1), point(2, 0.3)],
                (cells[("oracle", "clean")].key, 2): [point(0, 0.02), point(2, 0.05, 0.44)]}  # fmt: skip
    groups = [GroupState("circle", "uce", [2], [2, 1], [Pruned("clean", 2, 0.3, [cells[("uce", "clean")].key])]),
              GroupState("circle", "oracle", [2], [2])]  # fmt: skip
    grid = sorted(cells.values(), key=lambda c: c.key)
    ran, floors = _attacks_ran(grid, {c.key: c for c in done}, partials, groups)
    assert floors == {"circle": pytest.approx(0.45)}
    (table,) = [b for b in _by_data_blocks(preset, ran, contender_rank(preset)) if isinstance(b, Table)]
    assert [[row[1], row[2], row[3], row[4].rsplit(", ", 1)[1], row[5], row[6]] for row in table.rows] == [
        ["uce", "hrm-m", "0.900 [0.450, 1.000]", "step 2", "0.200 [0.200, 0.200]", "to the end"],
        ["uce", "clean", "0.300 [0.150, 0.600]", "step 2", "0.900 [0.900, 0.900]", "pruned at step 2, ran to 2 (a lower bound)"],
        ["oracle", "hrm-m", "0.020 [0.010, 0.040]", "step 0", "0.900 [0.900, 0.900]", "diverged at step 1"],
        ["oracle", "clean", "0.050 [0.025, 0.100]", "step 2", "0.440 [0.440, 0.440]", "paused at step 2 (still running)"],
    ]
    # While usable (retain alignment not clearly below 0.5 x the oracle's 0.9 = 0.45), uce's worst
    # case is the pruned benign attack's, and the oracle's step 2 (0.44 [0.44, 0.44]) does not count.
    (table,) = [b for b in _usable_blocks(ran, floors, contender_rank(preset), searched=True) if isinstance(b, Table)]
    assert [[row[1], row[2], row[3], row[4].rsplit(", ", 1)[1], row[6]] for row in table.rows] == [
        ["uce", "0.450", "0.300 [0.150, 0.600]", "step 2", "pruned at step 2, ran to 2 (a lower bound)"],
        ["oracle", "0.450", "0.020 [0.010, 0.040]", "step 0", table.rows[1][6]],
    ]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """The tiny search (3 settings x 2 contenders, eta 3) run by one process."""
    folder = tmp_path_factory.mktemp("search")
    preset = write_preset(folder, SEARCH)
    done = subprocess.run(bench_command(preset, folder / "search", "--halving", "3"), env=ENV, capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    store = ResultStore(folder / "search" / "results.sqlite")
    groups = store.meta("search:preset")["groups"]
    store.close()
    survivors = sum(g["candidates"][-1] for g in groups)
    assert f"6 cells: 0 finished before, {survivors} computed now, 6 attacks paused at a rung of the search" in done.stdout
    return preset, folder / "search"


def _best(points):
    return max(p["forget_rate"] for p in points), max(p["forget_rate_ci"][1] for p in points)


def test_a_halving_search_ends_its_survivors_exactly_as_the_full_grid_does(searched, tmp_path):
    """Every setting to step 2; on to step 4 the strongest third and whatever is not clearly
    weaker. The survivors' curves equal the uninterrupted runs of the full grid; the pruned ones'
    checkpoints are gone; a rerun computes nothing; the report shows the search."""
    preset, folder = searched
    tmp_path.joinpath("search").symlink_to(folder)
    full = subprocess.run(bench_command(preset, tmp_path / "full"), env=ENV, capture_output=True, text=True, check=False)
    assert full.returncode == 0, full.stderr
    done, everything = rows(tmp_path / "search"), rows(tmp_path / "full")
    assert len(everything) == 6 and 2 <= len(done) <= 6
    for key, row in done.items():
        assert row == everything[key]
    store = ResultStore(tmp_path / "search" / "results.sqlite")
    partials, events, search = store.partials(), store.events(), store.meta("search:preset")
    (ceiling,) = {c.summary["reference_forget_rate"] for c in store.cells()}  # the original model's forget rate
    store.close()
    assert len(partials) == 6
    for (key, step), points in partials.items():
        assert step == 2 and points == [p for p in everything[key][2] if p["step"] <= 2]
    for label in ("uce", "oracle"):
        rivals = [k for k in everything if everything[k][0]["label"] == label]
        kept = [k for k in rivals if k in done]
        # The strongest at step 2 continues; a pruned one is clearly weaker than every survivor,
        # unless the strongest had brought the concept fully back (settled: strict halving).
        strongest = max(_best(partials[(k, 2)])[0] for k in rivals)
        assert max(_best(partials[(k, 2)])[0] for k in kept) == strongest
        if strongest >= ceiling:
            assert len(kept) == 1
        for k in set(rivals) - set(kept):
            assert strongest >= ceiling or _best(partials[(k, 2)])[1] < min(_best(partials[(s, 2)])[0] for s in kept)
    for key in done:
        assert [what for cell, what in events if cell == key] == ["started to 2", "paused at 2", "started", "finished"]
    assert not list((tmp_path / "search" / "cells").glob("*.checkpoint"))
    assert all(g["candidates"][0] == 3 and g["complete"] for g in search["groups"])

    again = subprocess.run(bench_command(preset, tmp_path / "search", "--halving", "3"), env=ENV, capture_output=True,
                           text=True, check=False)  # fmt: skip
    assert again.returncode == 0 and "0 computed now" in again.stdout
    markdown = write_report(tmp_path / "search", tmp_path / "report")["markdown"].read_text()
    assert "Worst-case search" in markdown and "3 -> " in markdown and "(step 2)" in markdown
    assert "| circle | uce | hrm-m | " in markdown and "| circle | oracle | hrm-m | " in markdown


def test_a_search_run_one_contender_at_a_time_keeps_every_group_in_its_record_and_report(searched, tmp_path):
    """`--only` runs one group of the search: the next run's record keeps the groups before it,
    and the report shows every group begun (planned from the curves, not from the record)."""
    preset, straight = searched
    out = tmp_path / "bench"
    for label in ("uce", "oracle"):
        # A process like the fixture's (one thread): the search compares rates, which the
        # thread count moves in their last bits.
        done = subprocess.run(bench_command(preset, out, "--halving", "3", "--only", label), env=ENV, capture_output=True,
                              text=True, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
        store = ResultStore(out / "results.sqlite")
        recorded = store.meta("search:preset")["groups"]
        store.close()
        assert [g["contender"] for g in recorded] == (["uce"] if label == "uce" else ["oracle", "uce"])
    reference = ResultStore(straight / "results.sqlite")
    assert recorded == reference.meta("search:preset")["groups"]
    reference.close()
    assert rows(out) == rows(straight)
    search = write_report(out, tmp_path / "report")["markdown"].read_text().split("### Worst case by attack data")[0]
    assert "| circle | uce | 3 -> " in search and "| circle | oracle | 3 -> " in search and "still running" not in search


def test_two_shards_searching_at_once_find_what_one_process_finds(searched, tmp_path):
    """Each shard runs its half of every rung, then the other's cells that no process holds, and
    waits for the ones another process runs before the next rung."""
    preset, straight = searched
    out = tmp_path / "sharded"
    shards = [subprocess.Popen(bench_command(preset, out, "--halving", "3", "--shard", f"{i}/2"), env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]  # fmt: skip
    outputs = [p.communicate(timeout=600) for p in shards]
    assert all(p.returncode == 0 for p in shards), [err for _, err in outputs]
    assert rows(out) == rows(straight)
    stores = [ResultStore(folder / "results.sqlite") for folder in (out, straight)]
    assert stores[0].partials() == stores[1].partials()
    started = [cell for cell, what in stores[0].events() if what.startswith("started")]
    for store in stores:
        store.close()
    assert len(started) == 6 + len(rows(straight)) and len(set(started)) == 6  # each pause and each completion once


def test_a_search_shard_whose_partner_never_comes_finishes_the_search_alone(searched, tmp_path):
    """A shard does not wait for cells that no process holds (a partner that died, or never
    started): it runs them itself, and ends with what one process finds."""
    preset, straight = searched
    alone = subprocess.run(bench_command(preset, tmp_path / "alone", "--halving", "3", "--shard", "1/2"), env=ENV,
                           capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert alone.returncode == 0, alone.stderr
    assert rows(tmp_path / "alone") == rows(straight)


def test_concept_runs_one_concepts_cells_and_records_the_whole_preset(tmp_path):
    """--concept with --only is one job per model: its cells only, the preset recorded whole."""
    preset = write_preset(tmp_path, TINY | {"concepts": ["circle", "striped"],
                                            "attacks": [TINY["attacks"][0] | {"data": ["clean"]}]})  # fmt: skip
    out = tmp_path / "bench"
    summary = run_bench(str(preset), out, concepts=["striped"], only=["oracle"], progress=False)
    assert (summary.cells, summary.computed) == (4, 1)
    store = ResultStore(out / "results.sqlite")
    (_, entry), = store.meta_items("preset:")
    assert [(c.concept, c.contender) for c in store.cells()] == [("striped", "oracle")] and len(entry["cells"]) == 4
    store.close()
    wrong = subprocess.run(bench_command(preset, out, "--concept", "square,circle"), env=ENV, capture_output=True, text=True,
                           check=False)  # fmt: skip
    assert wrong.returncode == 2 and "--concept names concept(s) square" in wrong.stderr and "Traceback" not in wrong.stderr


GROWN = TINY | {"attacks": [TINY["attacks"][0] | {"data": ["hrm-m", "clean", "hrm-s"]}]}


@pytest.fixture(scope="module")
def continued_elsewhere(uninterrupted, tmp_path_factory):
    """The tiny grid's folder, grown by one oracle cell on another machine of the same host name
    (a lent GPU machine and the CPU one were both "vm")."""
    import shutil

    import unrelearn.bench.run as run_module

    _, straight = uninterrupted
    folder = tmp_path_factory.mktemp("elsewhere")
    out = shutil.copytree(straight, folder / "bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "_hardware", lambda device: "x86_64 Linux, 16 CPU cores, NVIDIA H200, device cuda")
        run_bench(str(write_preset(folder, GROWN)), out, only=["oracle"], progress=False)
    return out


def test_cells_run_on_two_machines_of_one_host_name_keep_their_own_environment(continued_elsewhere, tmp_path):
    """Each cell names the machine it ran on, and the folder keeps both machines' records."""
    store = ResultStore(continued_elsewhere / "results.sqlite")
    environments = dict(store.meta_items("environment:"))
    hosts = {(c.contender, c.attack.split()[0]): c.host for c in store.cells()}
    models = {m["contender"]: m["record"] for m in store.models()}
    store.close()
    here, there = hosts[("uce", "clean")], hosts[("oracle", "hrm-s")]
    assert len(environments) == 2 and here != there and hosts[("oracle", "clean")] == here
    assert "H200" in environments[there]["hardware"] and "H200" not in environments[here]["hardware"]
    assert models["uce"]["machine"] == here
    markdown = Path(write_report(continued_elsewhere, tmp_path / "report")["markdown"]).read_text()
    assert f"`{there}`: x86_64 Linux, 16 CPU cores, NVIDIA H200" in markdown and f"`{here}`: " in markdown


def test_merge_brings_another_machines_cells_into_a_folder_and_overwrites_nothing(uninterrupted, continued_elsewhere, tmp_path):
    """Shards on machines without a shared file system: each runs into its own folder, merge joins them."""
    import shutil

    from unrelearn.bench.merge import merge_folders
    from unrelearn.io import output_lock

    _, straight = uninterrupted
    here = shutil.copytree(straight, tmp_path / "here")
    there = shutil.copytree(continued_elsewhere, tmp_path / "there")
    new = (set(rows(there)) - set(rows(here))).pop()
    with output_lock(here / "cells" / f"{new}.claim"):  # being computed here right now: left out
        assert (merge_folders(there, here).busy, set(rows(here))) == ([new], set(rows(straight)))
    summary = merge_folders(there, here)
    assert (summary.cells, summary.already, summary.differing, summary.busy) == (1, 4, [], [])
    assert rows(here) == rows(there)
    assert (here / "cells" / new / "curve.json").is_file() and (here / "grids" / f"cell-{new}.png").is_file()
    assert "6 cells, 5 finished" in list_bench(str(write_preset(tmp_path, GROWN)), here)
    # Again: nothing to do. Into an empty folder: everything, models and evaluations with it, but
    # for a model being unlearned there right now and its cells.
    store = ResultStore(there / "results.sqlite")
    uce = next(m["key"] for m in store.models() if m["contender"] == "uce")
    store.close()
    with output_lock(tmp_path / "empty" / "models" / f"{uce}.entry"):
        unlearning = merge_folders(there, tmp_path / "empty")
    assert (unlearning.cells, unlearning.models, len(unlearning.busy)) == (3, 1, 2)
    assert (merge_folders(there, here).cells, merge_folders(there, tmp_path / "empty").cells) == (0, 2)
    assert rows(tmp_path / "empty") == rows(there)
    # A cell both computed, to other results, and a model with other weights: this folder's kept, both said.
    with sqlite3.connect(there / "results.sqlite") as db:
        db.execute("UPDATE points SET forget_rate = 0.5 WHERE cell = ? AND step = 3", (new,))
        db.execute("UPDATE models SET record = json_set(record, '$.weights_sha256', ?) WHERE contender = 'uce'", ("f" * 64,))
    summary = merge_folders(there, here)
    assert summary.differing == [new] and rows(here)[new] != rows(there)[new]
    assert len(summary.other_weights) == 1 and "ffffffffffff" in summary.other_weights[0]
    markdown = Path(write_report(here, tmp_path / "report")["markdown"]).read_text()
    assert "Cells merged from another folder whose model had other weights there: uce on 'circle'" in markdown
    wrong = subprocess.run([sys.executable, "-m", "unrelearn.cli", "merge", str(tmp_path / "nothing"), str(here)], env=ENV,
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert wrong.returncode == 2 and "is not a benchmark folder" in wrong.stderr and "Traceback" not in wrong.stderr


def test_an_attack_that_diverges_ends_its_cell_and_the_search_goes_on(tmp_path):
    """SGD at an absurd rate blows the oracle's weights up at its first step: in a worst-case grid
    that is an outcome (a setting the attacker cannot use), so the cell finishes with the curve
    evaluated before and where it diverged, no model, no checkpoint, and the search completes."""
    preset = write_preset(tmp_path, TINY | {"attacks": [
        {"data": "clean", "steps": 4, "lr": 1e-4, "batch_size": 2, "data_size": 8, "eval_at": [0, 2, 4]},
        {"data": "hrm-m", "optimizer": "sgd", "steps": 4, "lr": 1e6, "batch_size": 2, "data_size": 8, "eval_at": [0, 2, 4]},
    ]})  # fmt: skip
    out = tmp_path / "bench"
    summary = run_bench(str(preset), out, only=["oracle"], halving=3, progress=False)
    # hrm-m diverged on its way to the first rung: a finished cell, not a paused attack; clean
    # paused there, then ran to its end.
    assert (summary.cells, summary.computed, summary.paused) == (4, 2, 1)
    store = ResultStore(out / "results.sqlite")
    cells = {c.attack.split()[0]: c for c in store.cells()}
    groups = store.meta("search:preset")["groups"]
    store.close()
    diverged = cells["hrm-m"]
    assert diverged.summary["diverged_at"] == 0 and [p["step"] for p in diverged.points] == [0]
    assert "diverged_at" not in cells["clean"].summary
    folder = out / "cells" / diverged.key
    assert json.loads((folder / "curve.json").read_text())["diverged_at"] == 0
    assert "training blew up at step 0" in json.loads((folder / "run.json").read_text())["diverged"]
    assert not (folder / "model").exists() and not list((out / "cells").glob("*.checkpoint"))
    assert groups[0]["complete"]
    markdown = write_report(out, tmp_path / "report")["markdown"].read_text()
    assert "(diverged at step 0)" in markdown and "Attacks that diverged" in markdown and "hrm-m full sgd lr=1e+06 4 steps, seed 0, at step 0" in markdown
