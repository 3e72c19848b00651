"""Metrics to a JSONL file and TensorBoard event files (tensorboardX: no TensorFlow needed),
plus the console progress line. Only process 0 writes."""
from __future__ import annotations

import json
import math
import os
import time

import jax


class MetricsWriter:
  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

  def write(self, step: int, metrics: dict, prefix: str):
    if not self.enabled:
      return
    record = {"step": int(step), **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in metrics.items():
      self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _clock(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
  """`step 120/3000 | loss 1.234 | acc 0.45 | 3.2 steps/s | 205 ex/s | ETA 15:02`."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int, enabled=True,
               metric: str = "accuracy"):
    """`metric`: the task's training metric shown after the loss (accuracy as `acc`)."""
    self.total, self.batch, self.enabled = total_steps, batch_size, enabled
    self.metric = metric
    self._t, self._step = time.perf_counter(), start_step

  def restart(self, step: int):
    """Exclude time spent outside training (evaluation) from the next rate."""
    self._t, self._step = time.perf_counter(), step

  def update(self, step: int, metrics: dict):
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._t, 1e-9)
    self._t, self._step = now, step
    if self.enabled:
      eta = (self.total - step) / rate if rate > 0 else float("inf")
      shown = "acc" if self.metric == "accuracy" else self.metric
      value = f" | {shown} {metrics[self.metric]:.3f}" if self.metric in metrics else ""
      print(f"step {step:>6}/{self.total} | loss {metrics['loss']:.4f}{value} | lr "
            f"{metrics['lr']:.2e} | {rate:.2f} steps/s | "
            f"{rate * self.batch:,.0f} ex/s | ETA {_clock(eta)}", flush=True)
    return rate
