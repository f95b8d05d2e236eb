"""Where a run's numbers go: the console, OUT/metrics.jsonl and TensorBoard (OUT/tb).

Only rank 0 writes. TensorBoard goes through DeepSpeed's monitor (the JSON's `tensorboard`
block, pinned to OUT/tb by the config resolver), so wandb/csv monitors configured in the JSON
receive the same scalars. One method per kind of line, so the training loop holds no formats.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Callable

from ds_gpt.errors import UserError, write_hint
from ds_gpt.tracking import WandbRun

# metrics.jsonl keys -> TensorBoard tags
TB_TAGS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s", "mfu": "train/mfu",
           "hfu": "train/hfu",
           "val_loss": "val/loss", "train_loss": "eval/train_loss"}
HELLASWAG_TAGS = {"acc": "hellaswag/acc", "acc_norm": "hellaswag/acc_norm"}
DISK_FULL_HINT = "free space under --out_dir (or move it), then resume with --init_from resume"


def _clean(value):
    """JSON has no NaN/inf: write them as null so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _leave_tensorboard_write_errors_to_the_main_thread() -> None:
    """TensorBoard writes its events from a thread of its own. A write that fails there (a full disk)
    ends that thread, and Python prints its traceback; tensorboard keeps the exception and raises it
    again in the main thread at the next write, where _guarded turns it into the run's one error
    line. So the thread's OSError is not printed; every other thread error still is."""
    if getattr(threading.excepthook, "_leaves_tensorboard_errors", False):
        return
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (issubclass(args.exc_type, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            default(args)

    hook._leaves_tensorboard_errors = True
    threading.excepthook = hook


class MetricsLogger:
    """metrics.jsonl lines (one os.write each: a reader never sees half a line, and a failed write
    is cut back to the last whole line), console lines and TensorBoard scalars.

    `mfu_of(tokens_per_s)` turns a throughput into model FLOPs utilisation (ds_gpt.mfu.mfu with
    the run's FLOPs per token, world size and peak bound in); `tokens_per_iter` is the global batch;
    `hfu_per_mfu` is hardware over model FLOPs (above 1 when activations are recomputed).
    """

    def __init__(self, out_dir: Path, enabled: bool, monitor=None, *, tokens_per_iter: int = 0,
                 mfu_of: Callable[[float], float] | None = None, hfu_per_mfu: float = 1.0,
                 wandb: WandbRun | None = None):
        self.enabled = enabled
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        if self.monitor is not None:
            _leave_tensorboard_write_errors_to_the_main_thread()
        self.wandb = wandb
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tokens_per_iter = tokens_per_iter
        self.mfu_of = mfu_of or (lambda tokens_per_s: float("nan"))
        self.hfu_per_mfu = hfu_per_mfu
        self._fd: int | None = None
        if enabled:
            self._fd = self._guarded(lambda: os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666))
            if self._last_byte() not in (b"", b"\n"):
                # A line cut short (a crashed node): end it, or the resumed run's first event
                # would be glued to it and lost with it.
                self._append(b"\n")

    def _last_byte(self) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return b""
            fh.seek(-1, os.SEEK_END)
            return fh.read(1)

    # --- the lines of a run -------------------------------------------------------------------

    def start(self, **fields) -> None:
        self.log({"event": "start", **fields})

    def train(self, iter_num: int, *, loss: float, lr: float, tokens: int, dt_s: float, peak_mem_mb: float) -> None:
        tokens_per_s = self.tokens_per_iter / dt_s
        utilisation = self.mfu_of(tokens_per_s)
        self.log({"iter": iter_num, "loss": loss, "lr": lr, "tokens": tokens, "dt_ms": dt_s * 1000,
                  "tokens_per_s": tokens_per_s, "mfu": utilisation, "hfu": utilisation * self.hfu_per_mfu,
                  "peak_mem_mb": peak_mem_mb},
                 f"iter {iter_num}: loss {loss:.4f}, time {dt_s * 1000:.2f}ms, mfu {utilisation * 100:.2f}%")

    def eval(self, iter_num: int, losses: dict[str, float], tokens: int) -> None:
        self.log({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], "tokens": tokens},
                 f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")

    def hellaswag(self, iter_num: int, tokens: int, result: dict) -> None:
        """lm-evaluation-harness's acc and acc_norm over `result["items"]` items (ds_gpt.hellaswag_eval)."""
        self.log({"event": "hellaswag", "iter": iter_num, "tokens": tokens, **result},
                 f"step {iter_num}: hellaswag acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} "
                 f"({result['items']:,} items)")
        if self.enabled:
            self._scalars({tag: result[key] for key, tag in HELLASWAG_TAGS.items()}, iter_num)

    def nonfinite(self, iter_num: int, *, lr: float, micro_batches: int, action: str) -> None:
        self.log({"event": "nonfinite_loss", "iter": iter_num, "lr": lr, "micro_batches": micro_batches,
                  "action": action},
                 f"iter {iter_num}: non-finite loss in {micro_batches} micro-batch(es) at lr {lr:.3e}: {action}")

    def memory(self, iter_num: int, per_rank: list[dict[str, int]]) -> None:
        """What DeepSpeed holds on each rank for parameters, gradients and optimizer state
        (ds_gpt.accounting); `state_bytes_per_rank` is the rank that holds most, as the planner
        reports it."""
        rank = max(range(len(per_rank)), key=lambda r: sum(per_rank[r].values()))
        heaviest = per_rank[rank]
        self.log({"event": "memory", "iter": iter_num, "state_bytes_per_rank": heaviest, "rank": rank,
                  "per_rank": per_rank},
                 f"memory on rank {rank}: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in heaviest.items()))

    def profile(self, event: dict) -> None:
        self.log(event, f"flops profile: profiler {event['profiler_fwd_flops']:.3e} vs analytic "
                        f"{event['analytic_fwd_flops']:.3e} fwd FLOPs, MFU {event['mfu_profiler']:.2%} "
                        f"vs {event['mfu_analytic']:.2%}")

    def stopped(self, iter_num: int, *, signal: str | None, exit_code: int) -> None:
        """A signal stopped the run at a step boundary, after a checkpoint of `iter_num`."""
        self.log({"event": "stopped", "iter": iter_num, "signal": signal, "exit_code": exit_code},
                 f"stopped by {signal or 'a signal on another rank'} after iteration {iter_num - 1}; checkpoint "
                 f"of iteration {iter_num} saved; exit {exit_code} (requeue)")

    # --- writing ------------------------------------------------------------------------------

    def log(self, record: dict, console: str | None = None) -> None:
        """Append one event; `iter` is the TensorBoard step."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **{k: _clean(v) for k, v in record.items()}}
        self._append((json.dumps(record) + "\n").encode())
        if console:
            print(console, flush=True)
        if "event" in record:
            return
        self._scalars({tag: record[key] for key, tag in TB_TAGS.items() if isinstance(record.get(key), (int, float))},
                      record["iter"])

    def _scalars(self, scalars: dict[str, float], iter_num: int) -> None:
        """TensorBoard (through DeepSpeed's monitor) and W&B, at step `iter_num`."""
        if scalars and self.monitor is not None:
            events = [(tag, value, iter_num) for tag, value in scalars.items()]
            self._guarded(lambda: self.monitor.write_events(events), what=f"{self.path.parent / 'tb'}")
        if scalars and self.wandb is not None:
            self.wandb.log(scalars, iter_num)

    def _append(self, line: bytes) -> None:
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(28, os.strerror(28), str(self.path))  # a short write: the disk filled mid-line
        except OSError as err:
            try:
                os.ftruncate(self._fd, size)  # back to the last whole line, so the file still parses
            except OSError:
                pass
            raise self._disk_error(err, str(self.path)) from None

    def _guarded(self, write: Callable, what: str | None = None):
        try:
            return write()
        except OSError as err:
            raise self._disk_error(err, what or str(self.path)) from None

    @staticmethod
    def _disk_error(err: OSError, what: str) -> UserError:
        return UserError(f"cannot write {what}: {err.strerror or err}", hint=write_hint(err, DISK_FULL_HINT))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None
