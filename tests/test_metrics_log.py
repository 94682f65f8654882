"""Run outputs after a resume: metrics.jsonl and the TensorBoard events agree with an uninterrupted run."""

import glob
import os
import struct

from tensorboardX.proto import event_pb2

from jaxrl_async.metrics_log import MetricsWriter, read_metrics


def _scalars(tb_dir: str) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in every event file under `tb_dir` (TFRecord framing:
    length u64, its CRC u32, the Event proto, its CRC u32)."""
    out = []
    for path in sorted(glob.glob(os.path.join(tb_dir, "*tfevents*"))):
        with open(path, "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_tensorboard_after_a_resume_holds_no_events_of_the_lost_steps(tmp_path):
    workdir = str(tmp_path)
    w = MetricsWriter(workdir)
    for step in range(6):
        w.write(step, {"loss": 10.0 + step})
    w.close()
    # The checkpoint was taken after 3 rows: steps 3..5 belong to the lost future and are redone.
    w = MetricsWriter(workdir, keep_lines=3)
    for step in (3, 4):
        w.write(step, {"loss": 20.0 + step})
    w.close()
    assert [r["loss"] for r in read_metrics(workdir)] == [10.0, 11.0, 12.0, 23.0, 24.0]
    assert sorted(_scalars(os.path.join(workdir, "tb"))) == [
        ("loss", 0, 10.0), ("loss", 1, 11.0), ("loss", 2, 12.0), ("loss", 3, 23.0), ("loss", 4, 24.0)]
    # A fresh run in the same workdir keeps nothing of the old one.
    MetricsWriter(workdir).close()
    assert _scalars(os.path.join(workdir, "tb")) == []
