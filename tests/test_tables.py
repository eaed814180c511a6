"""Paper-shaped tables drawn from the results store, checked against rows written by hand."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from unrelearn.bench.store import CellResult
from unrelearn.errors import UnrelearnError


def _point(step, rate, fid=None):
    return {"step": step, "forget_rate": rate, "forget_rate_ci": [round(max(0.0, rate - 0.1), 6), round(rate + 0.1, 6)],
            "retain_alignment": 0.9, "retain_alignment_ci": [0.8, 1.0], "precision": None, "precision_ci": None,
            "fid": fid, "kid": None, "kid_std": None}  # fmt: skip


def _cell(label, method, options, data, lr, points, oracle=False, mode="full"):
    attack = {"data": data, "lr": lr, "mode": mode, "optimizer": "adam", "steps": points[-1]["step"], "seed": 0}
    spec = {"contender": {"model": "builtin:shapes", "method": method, "options": options, "concept": "circle"},
            "attack": attack, "label": label, "oracle": oracle}  # fmt: skip
    return CellResult(f"{label}-{data}-{lr}-{mode}", "circle", label, f"{data} lr={lr:g}", 0, spec, {}, points, 1.0, "h")


def test_table1_rows_and_markdown_by_hand():
    from unrelearn.bench.tables import table1

    def cell(label, method, data, lr, rates, oracle=False, concept="circle"):
        points = [_point(step, rate, fid=300.0 if step == 0 else None) for step, rate in zip((0, 50, 100), rates)]
        made = _cell(label, method, {"gamma2": 0.05} if method and method.startswith("meta") else {}, data, lr, points, oracle)
        return replace(made, concept=concept, key=f"{concept}-{made.key}")

    cells = [
        cell("esd-u-1", "esd-u-1", "hrm-m", 1e-5, (0.2, 0.5, 0.6)),
        cell("esd-u-1", "esd-u-1", "clean", 1e-5, (0.2, 0.3, 0.4)),
        cell("meta:esd-u-1", "meta:esd-u-1", "hrm-m", 1e-5, (0.1, 0.3, 0.35)),
        cell("resalign:uce", "resalign:uce", "hrm-m", 1e-5, (0.0, 0.1, 0.2)),
        cell("resalign:esd-u-1", "resalign:esd-u-1", "hrm-m", 1e-5, (0.45, 0.7, 0.9)),
        cell("resalign", "resalign", "hrm-m", 1e-5, (0.3, 0.4, 0.5)),
        cell("oracle", None, "hrm-m", 1e-5, (0.0, 0.01, 0.02), oracle=True),
        cell("esd-u-1", "esd-u-1", "hrm-m", 1e-4, (0.2, 0.9, 1.0)),
        cell("esd-u-1", "esd-u-1", "hrm-s", 1e-5, (0.2, 0.25, 0.3), concept="striped"),
        cell("meta:esd-u-1 gamma2 0.5", "meta:esd-u-1", "hrm-s", 1e-5, (0.1, 0.2, 0.3), concept="striped"),
    ]
    table = table1(cells, "made by hand")
    names = {(r["label"], r["method"], r["variant"]) for r in table.rows}
    assert names == {("esd-u-1", "esd-u-1", "unlearn"), ("meta:esd-u-1", "esd-u-1", "meta"), ("resalign:uce", "uce", "resalign"),
                     ("resalign", "resalign", "unlearn"), ("oracle", "oracle", "oracle"),
                     ("meta:esd-u-1 gamma2 0.5", "esd-u-1", "meta"), ("resalign:esd-u-1", "esd-u-1", "resalign")}  # fmt: skip
    # One JSON row per evaluated step, in the shape; quality on the step-0 row only.
    assert len(table.rows) == 3 * len(cells)
    meta = {(r["attack"], r["step"]): r for r in table.rows if r["label"] == "meta:esd-u-1"}
    assert meta[("hrm-m", 100)]["forget_rate"] == 0.35 and meta[("hrm-m", 100)]["forget_rate_ci"] == [0.25, 0.45]
    assert meta[("hrm-m", 0)]["fid"] == 300.0 and "fid" not in meta[("hrm-m", 50)]
    assert meta[("hrm-m", 0)]["lr"] == 1e-5 and meta[("hrm-m", 0)]["options"] == {"gamma2": 0.05}
    # One Markdown table per concept, lr and length; columns: attacks in the paper's order by step.
    md = table.markdown
    assert "| esd-u-1 | meta (meta:esd-u-1 gamma2 0.5) | 0.100 [0.000, 0.200] / 0.900 [0.800, 1.000] / 300 |" in md
    assert md.count(", attack lr ") == 3 and "## circle, attack lr 0.0001, 100 steps" in md and "## striped, attack lr 1e-05, 100 steps" in md
    circle = md.split("## circle, attack lr 1e-05")[1].split("## ")[0]
    assert "| method | variant | before: forget rate / retain alignment / FID | hrm-m 50 | hrm-m 100 | clean 50 | clean 100 |" in circle
    assert "| esd-u-1 | unlearn | 0.200 [0.100, 0.300] / 0.900 [0.800, 1.000] / 300 | 0.500 [0.400, 0.600] | 0.600 [0.500, 0.700] | 0.300 [0.200, 0.400] | 0.400 [0.300, 0.500] |" in circle
    # Against its plain method, cell by cell: 0.35 [0.25, 0.45] sits below 0.6 [0.5, 0.7]; 0.3 [0.2, 0.4]
    # and 0.5 [0.4, 0.6] overlap at their ends (0.4), so no mark.
    assert "| esd-u-1 | meta | 0.100 [0.000, 0.200] / 0.900 [0.800, 1.000] / 300 | 0.300 [0.200, 0.400] | 0.350 [0.250, 0.450] ▼ | - | - |" in circle
    assert (meta[("hrm-m", 100)]["vs_plain"], meta[("hrm-m", 50)]["vs_plain"], meta[("hrm-m", 0)]["vs_plain"]) == ("below", "overlap", "overlap")
    assert {r["vs_plain"] for r in table.rows if r["variant"] in ("unlearn", "oracle")} == {None}
    # Above its plain method is marked too; a defended method without a plain row has nothing to compare.
    above = [r["vs_plain"] for r in table.rows if r["label"] == "resalign:esd-u-1"]
    assert above == ["above", "overlap", "above"]
    assert "| esd-u-1 | resalign | 0.450 [0.350, 0.550] ▲ / 0.900 [0.800, 1.000] / 300 | 0.700 [0.600, 0.800] | 0.900 [0.800, 1.000] ▲ | - | - |" in circle
    assert {r["vs_plain"] for r in table.rows if r["label"] == "resalign:uce"} == {None}
    # Each method's plain row before its defended ones, the oracle last.
    order = [line.split(" | ")[:2] for line in circle.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert order == [["| esd-u-1", "unlearn"], ["| esd-u-1", "meta"], ["| esd-u-1", "resalign"], ["| resalign", "unlearn"],
                     ["| uce", "resalign"], ["| oracle", "oracle"]]  # fmt: skip
    assert set(table.curves) == {"table1-circle-hrm-m-lr1e-05-100.png", "table1-circle-clean-lr1e-05-100.png",
                                 "table1-circle-hrm-m-lr0.0001-100.png", "table1-striped-hrm-s-lr1e-05-100.png"}  # fmt: skip
    with pytest.raises(UnrelearnError, match="seeds"):
        table1(cells + [replace(cells[0], key="seed1", seed=1)], "")
    assert not any(r["broken"] for r in table.rows)
    # The claims section: each defence named as the preset names it against its plain method at the last step
    # (0.35 against 0.6: -42%, intervals apart); a tuning label and a defence without a plain row are left out.
    claims = md.split("## Each defence against its plain method")[1]
    assert "| circle | 1e-05 | esd-u-1 | meta | hrm-m 100 | 0.600 [0.500, 0.700] | 0.350 [0.250, 0.450] | -42% | below | +0.000 |" in claims
    assert "| circle | 1e-05 | esd-u-1 | resalign | hrm-m 100 | 0.600 [0.500, 0.700] | 0.900 [0.800, 1.000] | +50% | above |" in claims
    assert "gamma2 0.5" not in claims and "| uce |" not in claims and claims.count("| circle |") == 2


def test_table1_marks_a_defended_model_that_lost_its_retained_knowledge():
    from unrelearn.bench.tables import table1

    def cell(label, method, alignment, rates):
        points = [_point(step, rate) | {"retain_alignment": alignment, "retain_alignment_ci": [alignment - 0.05, alignment + 0.05]}
                  for step, rate in zip((0, 100), rates)]
        return _cell(label, method, {}, "hrm-m", 1e-5, points)

    # Alignment 0.44 is below half the plain method's 0.9; 0.46 is not.
    cells = [cell("sdd", "sdd", 0.9, (0.3, 0.6)), cell("meta:sdd", "meta:sdd", 0.44, (0.0, 0.05)),
             cell("meta:sdd gamma2=0.005", "meta:sdd", 0.46, (0.2, 0.4))]  # fmt: skip
    table = table1(cells, "made by hand")
    assert {r["label"]: r["broken"] for r in table.rows} == {"sdd": False, "meta:sdd": True, "meta:sdd gamma2=0.005": False}
    assert "| sdd | meta ✗ | 0.000 [0.000, 0.100] ▼ / 0.440 [0.390, 0.490] / n/a | 0.050 [0.000, 0.150] ▼ |" in table.markdown
    assert "| sdd | meta (meta:sdd gamma2=0.005) | 0.200" in table.markdown and "is broken" in table.markdown


def test_resalign_table_rows_and_markdown_by_hand():
    from unrelearn.bench.tables import resalign_table

    def cell(label, method, data, mode, lr, rates, options=None, oracle=False):
        points = [_point(step, rate) for step, rate in zip((0, 100, 200), rates)]
        return _cell(label, method, options or {}, data, lr, points, oracle, mode)

    cells = [
        cell("esd-u-1", "esd-u-1", "dimra-aux", "full", 1e-5, (0.2, 0.4, 0.55)),
        cell("esd-u-1", "esd-u-1", "hrm-m", "lora", 1e-4, (0.2, 0.3, 0.5)),
        cell("resalign-no-hypergradient", "resalign", "dimra-aux", "full", 1e-5, (0.6, 0.6, 0.65), {"beta": 0.0}),
        cell("oracle", None, "dimra-aux", "full", 1e-5, (0.04, 0.05, 0.04), oracle=True),
    ]
    table = resalign_table(cells, "made by hand")
    assert len(table.rows) == 3 * len(cells)
    row = next(r for r in table.rows if r["model"] == "resalign-no-hypergradient" and r["step"] == 200)
    assert (row["attack"], row["mode"], row["lr"], row["forget_rate"], row["forget_rate_ci"]) == ("dimra-aux", "full", 1e-5, 0.65, [0.55, 0.75])
    assert (row["method"], row["options"]) == ("resalign", {"beta": 0.0})
    md = table.markdown
    assert "| model | before | dimra-aux full lr 1e-05, 200 steps | hrm-m lora lr 0.0001, 200 steps |" in md
    assert "| esd-u-1 | 0.200 [0.100, 0.300] (0.900 [0.800, 1.000]) | 0.550 [0.450, 0.650] (0.900 [0.800, 1.000]) | 0.500 [0.400, 0.600] (0.900 [0.800, 1.000]) |" in md
    assert "| oracle | 0.040 [0.000, 0.140] (0.900 [0.800, 1.000]) | 0.040 [0.000, 0.140] (0.900 [0.800, 1.000]) | - |" in md
    # ESD-u-1 first, the oracle last.
    order = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert order == ["| esd-u-1", "| resalign-no-hypergradient", "| oracle"]
    assert set(table.curves) == {"resalign-circle-dimra-aux-full-lr1e-05.png", "resalign-circle-hrm-m-lora-lr0.0001.png"}


def test_write_table_names_the_command_of_the_whole_preset(tmp_path):
    from unrelearn.bench.store import ResultStore
    from unrelearn.bench.tables import write_table

    cells = [_cell("esd-u-1", "esd-u-1", {}, data, 1e-5, [_point(0, 0.2, fid=300.0), _point(100, 0.5)]) for data in ("hrm-m", "clean")]
    store = ResultStore(tmp_path / "results.sqlite")
    for cell in cells:
        store.add_cell(cell)
    keys = [c.key for c in cells]
    store.set_meta("preset:table1", {"cells": keys + ["not-run-yet"], "command": "unrelearn bench --preset table1 --out DIR"})
    store.set_meta("preset:urgent", {"cells": keys[:1], "command": "unrelearn bench --preset urgent.json --out DIR"})
    store.close()
    written = write_table("table1", tmp_path, tmp_path / "docs" / "meta_table1")
    markdown = written["markdown"].read_text()
    assert "`unrelearn bench --preset table1 --out DIR`" in markdown and "urgent" not in markdown
    rows = json.loads(written["json"].read_text())
    assert written["rows"] == 4 and len(rows) == 4
    assert rows[0]["commands"] == ["unrelearn bench --preset table1 --out DIR", f"unrelearn table table1 DIR --out {tmp_path / 'docs' / 'meta_table1'}"]
    assert all(figure.is_file() for figure in written["figures"])
    # One folder, two presets (table1 beside durability, say): --preset keeps one preset's cells and commands.
    store = ResultStore(tmp_path / "results.sqlite")
    store.add_cell(_cell("esd-u-1", "esd-u-1", {}, "hrm-m", 1e-4, [_point(0, 0.2, fid=300.0), _point(1000, 0.9)]))
    store.set_meta("preset:durability", {"cells": ["esd-u-1-hrm-m-0.0001-full"], "command": "unrelearn bench --preset durability --out DIR"})
    store.close()
    assert "## circle, attack lr 0.0001, 1000 steps" in write_table("table1", tmp_path, tmp_path / "all")["markdown"].read_text()
    only = write_table("table1", tmp_path, tmp_path / "only", presets=["table1"])
    assert only["rows"] == 4 and "--preset durability" not in only["markdown"].read_text()
    assert "--out " + str(tmp_path / "only") + " --preset table1`" in only["markdown"].read_text()
    assert json.loads(only["json"].read_text())[0]["commands"][-1].endswith("--preset table1")
    with pytest.raises(UnrelearnError, match="holds no preset 'adaptive'; it holds durability, table1, urgent"):
        write_table("table1", tmp_path, tmp_path / "x", presets=["adaptive"])


def test_table1_reads_the_self_destruction_signal_of_its_meta_models():
    from unrelearn.bench.grid import digest
    from unrelearn.bench.tables import table1

    points = [_point(0, 0.2), _point(100, 0.5)]
    cells = [_cell("esd-u-1", "esd-u-1", {}, "hrm-m", 1e-5, points), _cell("meta:esd-u-1", "meta:esd-u-1", {}, "hrm-m", 1e-5, points)]
    curve = [{"step": i, "cos_ft_retain": c, "retain_shift": r} for i, (c, r) in
             enumerate([(0.4, 0.001), (0.2, -0.003), (float("nan"), 0.002), (0.0, 0.002), (-0.2, -0.004)])]  # fmt: skip
    models = [
        {"key": digest(cells[1].spec["contender"]), "concept": "circle", "contender": "meta:esd-u-1",
         "record": {"method": "meta:esd-u-1", "loss_curve": curve}},
        {"key": digest(cells[0].spec["contender"]), "concept": "circle", "contender": "esd-u-1",
         "record": {"method": "esd-u-1", "loss_curve": [{"step": 0, "loss": 0.1}]}},
        {"key": "not-attacked-here", "concept": "circle", "contender": "meta:uce", "record": {"method": "meta:uce", "loss_curve": curve}},
    ]  # fmt: skip
    signal = table1(cells, "made by hand", models).markdown.split("## The self-destruction signal")[1]
    # The NaN step is left out: four cosines, a quarter is one step; median |shift| of 1, 3, 2, 2, 4 thousandths.
    assert "| circle | meta:esd-u-1 | 4 | +0.400 | -0.200 | 25% | 0.002 |" in signal
    assert "meta:uce" not in signal and "| esd-u-1 |" not in signal
    assert "self-destruction" not in table1(cells, "made by hand").markdown


def test_table1_rows_come_in_the_same_order_in_every_process():
    """Tuning rows share their variant ("meta"); their order must not follow set order, which
    moves with string hashing from one process to the next."""
    import os
    import subprocess
    import sys

    script = (
        "import sys; sys.path.insert(0, 'tests'); from test_tables import _cell, _point; "
        "from unrelearn.bench.tables import table1; "
        "points = [_point(0, 0.2), _point(100, 0.5)]; "
        "labels = ['esd-u-1'] + [f'meta:esd-u-1 gamma2={g}' for g in (0.1, 0.12, 0.13, 0.15, 0.2, 0.5)]; "
        "cells = [_cell(l, l.split()[0], {}, 'hrm-m', 1e-5, points) for l in labels]; "
        "print(table1(cells, '').markdown)"
    )  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outputs = {subprocess.run([sys.executable, "-c", script], env=os.environ | {"PYTHONHASHSEED": str(seed)}, cwd=root,
                              capture_output=True, text=True, check=True).stdout for seed in range(3)}  # fmt: skip
    assert len(outputs) == 1
    rows = [line for line in outputs.pop().splitlines() if line.startswith("| esd-u-1 | meta (")]
    assert [row.split(" | ")[1] for row in rows] == sorted(row.split(" | ")[1] for row in rows)
