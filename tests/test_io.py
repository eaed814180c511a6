import json
import threading

import pytest

from unrelearn.io import write_json_atomic, write_text_atomic


def test_concurrent_writers_each_leave_a_whole_file_and_no_temporaries(tmp_path):
    # Benchmarks run in parts write the same table; a shared temporary name made one writer's
    # rename fail when another had just renamed it.
    path = tmp_path / "table.json"
    payloads = [{"writer": i, "rows": list(range(2000))} for i in range(8)]
    errors: list[BaseException] = []

    def write(payload: dict) -> None:
        try:
            write_json_atomic(path, payload)
        except OSError as error:  # raised in a thread it would only be a warning
            errors.append(error)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(path.read_text()) in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "table.md"
    write_text_atomic(path, "old\n")
    with pytest.raises(TypeError):
        write_text_atomic(path, None)  # type: ignore[arg-type]
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]


def test_merged_rows_from_two_stale_writers_are_all_kept(tmp_path):
    from unrelearn.io import merge_json_rows

    path = tmp_path / "table.json"
    keys = {"cells": ("model", "step")}
    first = {"cells": [{"model": "a", "step": 0, "rate": 0.1}]}
    second = {"cells": [{"model": "b", "step": 0, "rate": 0.2}]}  # never saw the first's rows
    merge_json_rows(path, first, keys, {"command": "one"})
    merged = merge_json_rows(path, second, keys, {"command": "two"})
    assert sorted((c["model"], c["rate"]) for c in merged["cells"]) == [("a", 0.1), ("b", 0.2)]
    updated = merge_json_rows(path, {"cells": [{"model": "a", "step": 0, "rate": 0.3}]}, keys, {})
    assert sorted((c["model"], c["rate"]) for c in updated["cells"]) == [("a", 0.3), ("b", 0.2)]
    assert updated["command"] == "two" and json.loads(path.read_text()) == updated


def test_command_legend_numbers_each_rows_command_once():
    from unrelearn.io import command_legend

    rows = [{"command": "run a"}, {"command": "run b"}, {"command": "run a"}, {"x": 1}]
    lines, marks = command_legend(rows)
    assert "1. `run a`" in lines and "2. `run b`" in lines and sum(line.startswith(("1.", "2.")) for line in lines) == 2
    assert [marks[r.get("command")] for r in rows] == ["1", "2", "1", "-"]
    assert any("predate" in line for line in lines)
    assert not any("predate" in line for line in command_legend(rows[:3])[0])
