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
