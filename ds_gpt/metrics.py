"""Where a run's numbers go: the console, OUT/metrics.jsonl and TensorBoard (OUT/tb).

Only rank 0 writes. TensorBoard goes through DeepSpeed's monitor (the JSON's `tensorboard`
block, pinned to OUT/tb by the config resolver), so wandb/csv monitors configured in the JSON
receive the same scalars.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

# metrics.jsonl keys -> TensorBoard tags
TB_TAGS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s", "mfu": "train/mfu",
           "val_loss": "val/loss", "train_loss": "eval/train_loss"}


def _clean(value):
    """JSON has no NaN/inf: write them as null so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    def __init__(self, out_dir: Path, enabled: bool, monitor=None):
        self.enabled = enabled
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self.path = Path(out_dir) / "metrics.jsonl"
        self._fh = open(self.path, "a", buffering=1) if enabled else None
        if self._fh is not None and self._fh.tell() > 0:
            with open(self.path, "rb") as fh:
                fh.seek(-1, 2)
                if fh.read(1) != b"\n":
                    # A line cut short (a full disk, a crashed node): end it, or the resumed run's
                    # first event would be glued to it and lost with it.
                    self._fh.write("\n")

    def log(self, record: dict, console: str | None = None) -> None:
        """Append one event; `iter` is the TensorBoard step."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **{k: _clean(v) for k, v in record.items()}}
        self._fh.write(json.dumps(record) + "\n")
        if console:
            print(console, flush=True)
        if self.monitor is not None and "event" not in record:
            events = [(tag, record[key], record["iter"]) for key, tag in TB_TAGS.items()
                      if isinstance(record.get(key), (int, float))]
            if events:
                self.monitor.write_events(events)

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None
