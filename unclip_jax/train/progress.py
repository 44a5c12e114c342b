"""Throughput, MFU and ETA for the log line (warm-up steps are not counted)."""
import time


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
  """Measures steps between log lines; skips the compile of the first step."""

  def __init__(self, *, total_steps: int, batch_size: int,
               flops_per_step_per_device: float, peak_flops: float):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.flops = flops_per_step_per_device
    self.peak = peak_flops
    self._mark_time = None
    self._mark_step = None
    self._excluded = 0.0  # seconds spent in eval/checkpoint since the mark

  def start(self, step: int) -> None:
    self._mark_time, self._mark_step = time.perf_counter(), step
    self._excluded = 0.0

  def exclude(self, seconds: float) -> None:
    self._excluded += seconds

  def measure(self, step: int) -> dict[str, float]:
    """Throughput since the last mark; resets the mark."""
    now = time.perf_counter()
    steps = step - self._mark_step
    seconds = max(now - self._mark_time - self._excluded, 1e-9)
    self.start(step)
    if steps <= 0:
      return {}
    step_time = seconds / steps
    perf = {"perf/step_time": step_time,
            "perf/examples_per_sec": self.batch_size / step_time,
            "perf/eta_seconds": step_time * (self.total_steps - step)}
    if self.flops and self.peak:
      perf["perf/mfu"] = self.flops / step_time / self.peak
    return perf

  def line(self, step: int, loss: float, perf: dict[str, float]) -> str:
    text = f"step {step}/{self.total_steps} loss {loss:.4f}"
    if perf:
      text += (f" | {perf['perf/examples_per_sec']:.1f} ex/s"
               f" | eta {format_duration(perf['perf/eta_seconds'])}")
      if "perf/mfu" in perf:
        text += f" | mfu {perf['perf/mfu']:.1%}"
    return text
