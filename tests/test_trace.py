"""The observer and the trace files without a daemon: bounded queue, rotation, modes."""

from __future__ import annotations

import stat
from pathlib import Path

from kernel.process import Caller, ProcessTable
from kernel.syscall import Call
from kernel.trace import FileSpanExporter, Observer, read_spans, trace_files


def calls(n: int, name: str = "proc.getpid") -> list[Call]:
    table = ProcessTable(owner="test")
    proc = table.spawn(1, "t", "m", 0, None, None, None)
    return [Call(i, name, Caller(proc.pid, proc), 0.0, b"", lambda *_: None) for i in range(n)]


def test_a_full_queue_drops_records_and_counts_them(tmp_path: Path) -> None:
    obs = Observer(tmp_path)
    obs.max_pending = 10
    for call in calls(15):
        obs.begin(call)
        obs.end(call, None, None)
    assert obs.dropped == 5
    assert obs.drain() == 10
    obs.close()
    spans = list(read_spans(tmp_path))
    assert len(spans) == 10 and {s["name"] for s in spans} == {"proc.getpid"}
    pid = spans[0]["attrs"]["llmos.pid"]
    assert {s["parent"] for s in spans} == {f"{obs.ids.process(pid):016x}"}  # its process span


def test_trace_files_rotate_within_their_bound_and_stay_owner_only(tmp_path: Path) -> None:
    obs = Observer(tmp_path)
    exporter = FileSpanExporter(tmp_path, max_bytes=4000, backups=2)
    obs._exporters = [exporter]
    batch = calls(100)
    for i in range(0, 100, 5):  # 20 exports of 5 spans (~330 bytes each)
        for call in batch[i : i + 5]:
            obs.begin(call)
            obs.end(call, None, None)
        obs.drain()
    obs.close()
    files = trace_files(tmp_path)
    assert [f.name for f in files] == ["spans.jsonl.2", "spans.jsonl.1", "spans.jsonl"]
    for f in files:
        assert f.stat().st_size <= 4000
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    ids = [s["span"] for s in read_spans(tmp_path)]
    assert ids == sorted(ids)  # oldest file first: the newest spans kept, in order
    assert ids[-1] == f"{batch[-1].span_id:016x}"
    assert len(ids) < 100  # the oldest were rotated away


def test_one_large_batch_is_split_across_files_within_the_bound(tmp_path: Path) -> None:
    obs = Observer(tmp_path)
    obs._exporters = [FileSpanExporter(tmp_path, max_bytes=3000, backups=3)]
    batch = calls(40)
    for call in batch:
        obs.begin(call)
        obs.end(call, None, None)
    obs.drain()  # one export of 40 spans, ~13 kB
    obs.close()
    files = trace_files(tmp_path)
    assert len(files) == 4 and all(f.stat().st_size <= 3000 for f in files)
    ids = [s["span"] for s in read_spans(tmp_path)]
    assert ids == sorted(ids) and ids[-1] == f"{batch[-1].span_id:016x}"
