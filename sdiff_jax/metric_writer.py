"""Scalar metrics to TensorBoard event files (no TensorFlow needed) and the console."""

import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricWriter:
  """Writes scalars to `logdir`; a no-op writer when `enabled` is False (non-zero hosts)."""

  def __init__(self, logdir: str, enabled: bool = True):
    self._writer = EventFileWriter(logdir) if enabled else None

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer is None:
      return
    summary = summary_pb2.Summary(
      value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
    )
    self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
