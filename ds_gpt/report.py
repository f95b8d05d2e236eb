"""Summarize a finished (or running) run against nanoGPT's baseline: OUT/report.md and OUT/report.png.

    python -m ds_gpt.report out/gpt2-124M

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
    records = []
    for line in path.read_bytes().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # UnicodeDecodeError included
            continue  # a line cut short by a killed run (or garbled by a crash); the others still count
    if not records:
        raise UserError(f"{path} has no events yet", hint="wait for the first log_interval, then re-run")
    return records


def load_config(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def split_events(records: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, eval, flops_profile) events, ordered by iter. A resumed run logs some iterations
    twice (it restarts from its last checkpoint): the later line wins."""
    train, evals, profiles = {}, {}, []
    for r in records:
        if r.get("event") == "flops_profile":
            profiles.append(r)
        elif "event" in r or "iter" not in r:
            continue
        elif r.get("val_loss") is not None:
            evals[r["iter"]] = r
        elif r.get("loss") is not None:
            train[r["iter"]] = r
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)], profiles


def steady_state(train: list[dict]) -> list[dict]:
    """The train events after warm-up: drop the first 10% (at least 2), keep at least one."""
    skip = min(len(train) - 1, max(2, len(train) // 10))
    return train[max(skip, 0):]


def median_of(events: list[dict], key: str) -> float | None:
    values = [e[key] for e in events if isinstance(e.get(key), (int, float)) and math.isfinite(e[key])]
    return statistics.median(values) if values else None


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
    ds = config.get("ds_config") or {}
    block = _get(config, "model", "block_size")
    global_batch = ds.get("train_batch_size")
    steady = steady_state(train) if train else []
    peaks = [e["peak_mem_mb"] for e in train if isinstance(e.get("peak_mem_mb"), (int, float))]
    profile = profiles[-1] if profiles else {}
    # A train line's iter is the iteration it finished (0-based); an eval line's iter is the count
    # done when it ran, so the final eval also counts the iterations the log interval skipped.
    iterations_done = [e["iter"] for e in evals] + ([train[-1]["iter"] + 1] if train else [])
    hosts = config.get("hosts") or []
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
        "mfu_profiler": profile.get("mfu_profiler"),
        "hfu": median_of(steady, "hfu"),
        "activation_checkpointing": _get(config, "train", "activation_checkpointing"),
        "profile_iter": profile.get("iter"),
        "profile_agree": profile.get("agree"),
        "profile_ratio": profile.get("flops_ratio"),
        "peak_mem_mb": max(peaks) if peaks else None,
        "peak_source": config.get("peak_source"),
        "final_loss": train[-1]["loss"] if train else None,
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
        profiler += f" (iter {s['profile_iter']}, profiler/analytic FLOPs {s['profile_ratio']:.3f})"
        if not s["profile_agree"]:
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
        ("MFU (analytic, 6N + 12LTd)", _fmt(s["mfu_analytic"], ".2%") + f" (peak: {_fmt(s['peak_source'])})"),
        ("MFU (flops profiler)", profiler),
        ("HFU (recompute counted)", _fmt(s["hfu"], ".2%") + f" (activation checkpointing: "
                                    f"{_fmt(s['activation_checkpointing'])})"),
        ("peak memory per rank", peak_mem),
        ("iterations", _fmt(s["iters"])),
        ("final train loss", _fmt(s["final_loss"], ".4f")),
        ("val loss (final / best)", f"{_fmt(s['final_val_loss'], '.4f')} / {_fmt(s['best_val_loss'], '.4f')}"),
    ]
    lines = [f"# Run report: {out_dir.name}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "nanoGPT baseline (the reference run, `estimate_mfu` at 312 TFLOPS): ~34% MFU on 8 x A100 "
              "at ~480 ms/iter, "
              "~39% on 2 x A100 at ~1680 ms/iter.", "", "![curves](report.png)", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the curves

def plot(path: Path, train: list[dict], evals: list[dict], profiles: list[dict],
         ys: list[yardsticks.Yardstick] = (), scores: list[dict] = ()) -> None:
    """The run's curves; below them val loss and HellaSwag (`scores`) against the yardsticks `ys`."""
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
    for value, label in BASELINES:
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
    atomic.write_with(png, lambda tmp: plot(tmp, train, evals, profiles, ys, scores))
    atomic.write_text(md, render_markdown(out_dir, summary) + "\n".join(yardsticks.markdown(ys, evals, scores)))
    return md, png


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m ds_gpt.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="the run directory (holds metrics.jsonl and config.json)")
    args = ap.parse_args(argv)
    md, png = write_report(args.out_dir)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.report")
