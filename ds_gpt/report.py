"""Summarize a finished (or running) run against nanoGPT's baseline: OUT/report.md and OUT/report.png.

    python -m ds_gpt.report --out_dir out/gpt2-124M     # or: python -m ds_gpt.report out/gpt2-124M

Reads only the run directory's contract: OUT/metrics.jsonl (train events: iter, loss, lr,
tokens, dt_ms, tokens_per_s, mfu, optional peak_mem_mb; eval events add val_loss; other events
carry "event", e.g. "flops_profile") and OUT/config.json (world_size, device, model, ds_config...).
Missing optional fields read "n/a". Steady-state figures are medians over the train events
after a warm-up (the first 10%, at least 2), so compilation, first-touch allocation and the
odd eval or checkpoint iteration do not move them.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from ds_gpt import atomic, yardsticks
from ds_gpt.errors import ArgumentParser, UserError, run_cli

# The reference run's nanoGPT figures (estimate_mfu against 312 TFLOPS, 124M, 491,520 tokens/iter).
BASELINES = [(0.34, "nanoGPT 8xA100 (34%)"), (0.39, "nanoGPT 2xA100 (39%)")]
NA = "n/a"


# -----------------------------------------------------------------------------
# reading the run directory

def load_metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no metrics file at {path}", hint="pass the --out_dir of a run that has logged")
    records = yardsticks.read_events(path)
    if not records:
        raise UserError(f"{path} has no events yet", hint="wait for the first log_interval, then re-run")
    return records


def load_config(out_dir: Path) -> dict:
    """OUT/config.json, or {} when it is missing, unreadable or not an object (its figures read "n/a")."""
    try:
        config = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def split_events(records: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, eval, flops_profile) events, ordered by iter. A resumed run logs some iterations
    twice (it restarts from its last checkpoint): the later line wins."""
    train, evals, profiles = {}, {}, []
    for r in records:
        if r.get("event") == "flops_profile":
            profiles.append(r)
        elif "event" in r or not isinstance(r.get("iter"), int):
            continue
        elif _number(r.get("val_loss")) is not None:
            evals[r["iter"]] = r
        elif _number(r.get("loss")) is not None:
            train[r["iter"]] = r
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)], profiles


def steady_state(train: list[dict]) -> list[dict]:
    """The train events after warm-up: drop the first 10% (at least 2), keep at least one."""
    skip = min(len(train) - 1, max(2, len(train) // 10))
    return train[max(skip, 0):]


def median_of(events: list[dict], key: str) -> float | None:
    values = [e[key] for e in events if _number(e.get(key)) is not None]
    return statistics.median(values) if values else None


def _number(value) -> float | None:
    """A finite number from a record, else None (a hand-edited or garbled field reads "n/a")."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def _get(d: dict, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


# -----------------------------------------------------------------------------
# the summary table

def summarize(config: dict, train: list[dict], evals: list[dict], profiles: list[dict]) -> dict:
    """The report's figures as plain values (None where the run does not say)."""
    ds = config.get("ds_config") if isinstance(config.get("ds_config"), dict) else {}
    block = _get(config, "model", "block_size")
    global_batch = ds.get("train_batch_size")
    steady = steady_state(train) if train else []
    peaks = [e["peak_mem_mb"] for e in train if _number(e.get("peak_mem_mb")) is not None]
    profile = profiles[-1] if profiles else {}
    # A train line's iter is the iteration it finished (0-based); an eval line's iter is the count
    # done when it ran, so the final eval also counts the iterations the log interval skipped.
    iterations_done = [e["iter"] for e in evals] + ([train[-1]["iter"] + 1] if train else [])
    hosts = config.get("hosts") if isinstance(config.get("hosts"), list) else []
    return {
        "hardware": config.get("device"),
        "hosts": len(hosts) if hosts else None,
        "launcher": config.get("launcher"),
        "world_size": config.get("world_size"),
        "zero_stage": config.get("zero_stage", _get(ds, "zero_optimization", "stage")),
        "dtype": config.get("dtype", _get(config, "train", "dtype")),
        "global_batch": global_batch,
        "micro_batch": ds.get("train_micro_batch_size_per_gpu"),
        "grad_accum": ds.get("gradient_accumulation_steps"),
        "tokens_per_iter": global_batch * block if global_batch and block else None,
        "iters": max(iterations_done, default=None),
        "steady_iters": len(steady),
        "ms_per_iter": median_of(steady, "dt_ms"),
        "tokens_per_s": median_of(steady, "tokens_per_s"),
        "mfu_analytic": median_of(steady, "mfu"),
        "mfu_profiler": _number(profile.get("mfu_profiler")),
        "hfu": median_of(steady, "hfu"),
        "activation_checkpointing": _get(config, "train", "activation_checkpointing"),
        "profile_iter": profile.get("iter"),
        "profile_agree": profile.get("agree"),
        "profile_ratio": _number(profile.get("flops_ratio")),
        # Both figures of the profile event use one step time: the iteration before the profiled
        # one (the profiler's hooks slow the profiled one). The analytic row above is a median.
        "profile_step_ms": None if _number(profile.get("step_time_s")) is None else 1000 * profile["step_time_s"],
        "profile_mfu_analytic": _number(profile.get("mfu_analytic")),
        "peak_mem_mb": max(peaks) if peaks else None,
        "peak_source": config.get("peak_source"),
        # The last train line's loss is one global batch; the console's closing `step N:` line is the
        # last eval's (eval_iters batches per split). Both are reported, each under its own name.
        "final_loss": train[-1]["loss"] if train else None,
        "final_loss_iter": train[-1]["iter"] if train else None,
        "final_eval_iter": evals[-1]["iter"] if evals else None,
        "final_eval_train_loss": _number(evals[-1].get("train_loss")) if evals else None,
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "best_val_loss": min(e["val_loss"] for e in evals) if evals else None,
    }


def _fmt(value, spec: str = "", suffix: str = "") -> str:
    if value is None:
        return NA
    return f"{value:{spec}}{suffix}"


def render_markdown(out_dir: Path, s: dict) -> str:
    hardware = _fmt(s["hardware"])
    if s["hosts"]:
        hardware += f" ({s['hosts']} host{'s' if s['hosts'] > 1 else ''}, {_fmt(s['launcher'])})"
    batch = _fmt(s["global_batch"], ",", " sequences")
    if s["tokens_per_iter"]:
        batch += f" = {s['tokens_per_iter']:,} tokens (micro {_fmt(s['micro_batch'])} x accum {_fmt(s['grad_accum'])}" \
                 f" x {_fmt(s['world_size'])} ranks)"
    profiler = _fmt(s["mfu_profiler"], ".2%")
    if s["mfu_profiler"] is not None:
        profiler += (f" (iter {s['profile_iter']}: its FLOPs over one step time, "
                     f"{_fmt(s['profile_step_ms'], ',.1f')} ms, the iteration before it; the analytic count over "
                     f"that time: {_fmt(s['profile_mfu_analytic'], '.2%')}; profiler/analytic FLOPs "
                     f"{_fmt(s['profile_ratio'], '.3f')})")
        if s["profile_agree"] is False:
            profiler += " **DISAGREES with the analytic count by more than 5%**"
    peak_mem = NA if s["peak_mem_mb"] is None else f"{s['peak_mem_mb'] / 1024:.2f} GiB"
    if s["peak_mem_mb"] is not None and s["hardware"] == "cpu":
        peak_mem += " (host RSS high-water mark)"
    rows = [
        ("hardware", hardware),
        ("world size", _fmt(s["world_size"])),
        ("ZeRO stage", _fmt(s["zero_stage"])),
        ("dtype", _fmt(s["dtype"])),
        ("global batch", batch),
        ("ms/iter", _fmt(s["ms_per_iter"], ",.1f") + f" (median of {s['steady_iters']} steady iterations)"),
        ("tokens/s", _fmt(s["tokens_per_s"], ",.0f")),
        ("MFU (analytic, 6N + 12LTd)", _fmt(s["mfu_analytic"], ".2%") + f" (median of the steady iterations, "
                                       f"each over its own time; peak: {_fmt(s['peak_source'])})"),
        ("MFU (flops profiler)", profiler),
        ("HFU (recompute counted)", _fmt(s["hfu"], ".2%") + f" (activation checkpointing: "
                                    f"{_fmt(s['activation_checkpointing'])})"),
        ("peak memory per rank", peak_mem),
        ("iterations", _fmt(s["iters"])),
        ("train loss, last logged iteration", _fmt(s["final_loss"], ".4f")
         + ("" if s["final_loss"] is None else f" (iter {s['final_loss_iter']}: that iteration's global batch)")),
        ("last eval, train / val loss",
         f"{_fmt(s['final_eval_train_loss'], '.4f')} / {_fmt(s['final_val_loss'], '.4f')}"
         + ("" if s["final_eval_iter"] is None else f" (the console's `step {s['final_eval_iter']}:` line)")),
        ("best val loss", _fmt(s["best_val_loss"], ".4f")),
    ]
    lines = [f"# Run report: {out_dir.name}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    baseline = ("nanoGPT baseline (the reference run, `estimate_mfu` at 312 TFLOPS): ~34% MFU on 8 x A100 "
                "at ~480 ms/iter, ~39% on 2 x A100 at ~1680 ms/iter.")
    if not on_gpu(s["hardware"]):
        baseline += " Those are GPU figures: this run's MFU is not comparable with them, and the plot leaves them out."
    lines += ["", baseline, "", "![curves](report.png)", ""]
    return "\n".join(lines)


def on_gpu(hardware) -> bool:
    """Was the run on a GPU (config.json's device), where the reference run's A100 figures compare?"""
    return isinstance(hardware, str) and hardware.lower() not in ("cpu", "")


# -----------------------------------------------------------------------------
# the curves

def loss_axis_top(points: list[tuple[float, float]]) -> float | None:
    """Where to cut the loss axis so the curve after the first iterations is readable: the highest
    loss after the first 5% of the run, plus a margin. None when the cut would gain little (the
    full range is less than twice the cut one).

    Training starts at ln(vocab) ~ 10.8 and drops within a few percent of the run to well under
    half of that; a linear axis up to 10.8 squeezes everything after into its bottom third.
    """
    if len(points) < 3:
        return None
    first, last = points[0][0], points[-1][0]
    later = [v for i, v in points if i >= first + 0.05 * (last - first)]
    lowest, highest = min(v for _, v in points), max(v for _, v in points)
    top = max(later, default=highest)
    top += 0.05 * (top - lowest) or 0.05
    return top if highest - lowest > 2 * (top - lowest) else None


def plot(path: Path, train: list[dict], evals: list[dict], profiles: list[dict], gpu: bool = True,
         ys: list[yardsticks.Yardstick] = (), scores: list[dict] = ()) -> None:
    """The run's curves; below them val loss and HellaSwag (`scores`) against the yardsticks `ys`.
    `gpu`: the run's hardware, so that a CPU run is not drawn against the reference run's A100 MFU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(events, key):
        pts = [(e["iter"], e[key]) for e in events if isinstance(e.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(4, 2, figsize=(11, 15))
    (ax_loss, ax_lr), (ax_tps, ax_mfu) = axes[:2]
    ax_loss.plot(*series(train, "loss"), label="train (global batch)", lw=1)
    if evals:
        ax_loss.plot(*series(evals, "val_loss"), "o-", label="val", ms=3)
    ax_loss.set(title="loss", xlabel="iter", ylabel="cross-entropy")
    points = sorted(zip(*series(train, "loss"), strict=True)) + sorted(zip(*series(evals, "val_loss"), strict=True))
    top = loss_axis_top(sorted(points))
    if top is not None:
        ax_loss.set_ylim(top=top)
        ax_loss.set_title(f"loss (axis cut at {top:.2f}; the run starts at {max(v for _, v in points):.2f})")
    ax_loss.legend()
    ax_lr.plot(*series(train, "lr"), color="tab:gray")
    ax_lr.set(title="learning rate", xlabel="iter")
    ax_tps.plot(*series(train, "tokens_per_s"), color="tab:green", lw=1)
    ax_tps.set(title="throughput", xlabel="iter", ylabel="tokens/s")
    iters, mfus = series(train, "mfu")
    ax_mfu.plot(iters, [100 * m for m in mfus], label="analytic", lw=1)
    for p in profiles:
        if isinstance(p.get("mfu_profiler"), (int, float)):
            ax_mfu.plot(p["iter"], 100 * p["mfu_profiler"], "r*", ms=12, label="flops profiler")
    for value, label in BASELINES if gpu else []:  # A100 figures: no yardstick for a CPU run
        ax_mfu.axhline(100 * value, ls="--", lw=1, color="tab:orange" if value < 0.35 else "tab:purple", label=label)
    ax_mfu.set(title="MFU", xlabel="iter", ylabel="% of peak")
    ax_mfu.legend(fontsize=8)
    yardsticks.plot(axes[2:], ys, evals, scores)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def write_report(out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    records, config = load_metrics(out_dir), load_config(out_dir)
    train, evals, profiles = split_events(records)
    summary = summarize(config, train, evals, profiles)
    ys, scores = yardsticks.for_run(out_dir, config), yardsticks.hellaswag_events(records)
    md, png = out_dir / "report.md", out_dir / "report.png"
    # Whole files or the old ones: a full disk or a read-only run directory leaves no half report.
    atomic.write_with(png, lambda tmp: plot(tmp, train, evals, profiles, on_gpu(summary["hardware"]), ys, scores))
    atomic.write_text(md, render_markdown(out_dir, summary) + "\n".join(yardsticks.markdown(ys, evals, scores)))
    return md, png


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m ds_gpt.report", description=__doc__.split("\n\n")[0])
    # The run directory as every other command takes it (--out_dir), or positionally as before.
    ap.add_argument("run_dir", nargs="?", type=Path, help="the run directory (holds metrics.jsonl and config.json)")
    ap.add_argument("--out_dir", type=Path, help="the run directory, as the other commands take it")
    args = ap.parse_args(argv)
    if (args.run_dir is None) == (args.out_dir is None):
        ap.error("give the run directory once: python -m ds_gpt.report --out_dir OUT (or OUT alone)")
    md, png = write_report(args.out_dir or args.run_dir)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.report")
