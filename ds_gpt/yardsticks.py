"""GPT-2 124M's figures a run is set against in its report, and when the run first reached each.

Published (docs/evaluation.md cites each):
    HellaSwag, lm-evaluation-harness's `hellaswag` task (0-shot, validation, 10,042 items), the
    scoring ds_gpt's in-loop HellaSwag reproduces: OpenAI's GPT-2 124M acc 28.92%, acc_norm 31.14%
    (the harness's figures as karpathy/llm.c's dev/data/hellaswag.py quotes them).
    OpenWebText val loss, from nanoGPT's README: OpenAI's GPT-2 124M evaluated on OWT, 3.12
    (its "baselines" table), and nanoGPT's own 124M run (config/train_gpt2.py), ~2.85.
Measured: the figures of an `--eval_only` run of other weights (`--init_from gpt2` scores OpenAI's
on this machine and this data; not `resume`/`auto`, which score the run's own checkpoint, a point
of its curve) whose run directory is OUT itself or a directory directly under it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "val_loss": False}


@dataclass(frozen=True)
class Yardstick:
    metric: str  # "val_loss", "acc" or "acc_norm" (HellaSwag)
    value: float
    label: str


HELLASWAG_GPT2 = (Yardstick("acc", 0.2892, "GPT-2 124M, harness (published)"),
                  Yardstick("acc_norm", 0.3114, "GPT-2 124M, harness (published)"))
OPENWEBTEXT_GPT2 = (Yardstick("val_loss", 3.12, "GPT-2 124M on OWT (nanoGPT)"),
                    Yardstick("val_loss", 2.85, "nanoGPT's 124M run (~2.85)"))


def read_events(path: Path) -> list[dict]:
    """The events of a metrics.jsonl: its lines that are JSON objects (the contract) with an integer
    iter or an event name. A line cut short by a killed run, or a list or a string someone appended,
    is no event; an iter that is not a count cannot be ordered with the others."""
    records = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # UnicodeDecodeError included
            continue
        if isinstance(record, dict) and (isinstance(record.get("iter"), int) or "event" in record):
            records.append(record)
    return records


def is_yardstick(event: dict) -> bool:
    """An --eval_only score of other weights (gpt2, an HF dir...), not of the run's own checkpoint."""
    return bool(event.get("eval_only")) and event.get("init_from") not in ("resume", "auto")


def hellaswag_events(records: list[dict]) -> list[dict]:
    """The run's own HellaSwag scores by iter (the later line wins after a resume)."""
    by_iter = {r["iter"]: r for r in records if r.get("event") == "hellaswag" and not is_yardstick(r)
               and isinstance(r.get("acc"), (int, float))}
    return [by_iter[k] for k in sorted(by_iter)]


def measured(out_dir: Path) -> list[Yardstick]:
    """Figures of --eval_only runs of other weights in OUT and the directories directly under it:
    HellaSwag, and the val loss of the same evaluation."""
    found = []
    for path in [out_dir / "metrics.jsonl", *sorted(out_dir.glob("*/metrics.jsonl"))]:
        records = read_events(path) if path.is_file() else []
        scores = [r for r in records if r.get("event") == "hellaswag" and is_yardstick(r)]
        if not scores:
            continue
        score = scores[-1]
        label = f"{score['init_from']}, measured"
        found += [Yardstick(metric, score[metric], label) for metric in ("acc", "acc_norm")]
        loss = next((r["val_loss"] for r in reversed(records) if "event" not in r and r.get("iter") == score["iter"]
                     and isinstance(r.get("val_loss"), (int, float))), None)
        if loss is not None:
            found.append(Yardstick("val_loss", loss, label))
    return found


def trained_on_openwebtext(config: dict) -> bool:
    """nanoGPT's val-loss figures are for OpenWebText's val split: the run's data_dir says which corpus."""
    train = config.get("train")
    data_dir = Path(str(train.get("data_dir", "") if isinstance(train, dict) else ""))
    try:
        return json.loads((data_dir / "meta.json").read_text()).get("dataset") == "openwebtext"
    except (OSError, ValueError, AttributeError):
        return data_dir.name == "openwebtext"


def for_run(out_dir: Path, config: dict) -> list[Yardstick]:
    published = [*HELLASWAG_GPT2, *(OPENWEBTEXT_GPT2 if trained_on_openwebtext(config) else ())]
    return published + measured(out_dir)


def first_reached(y: Yardstick, evals: list[dict], scores: list[dict]) -> dict | None:
    """The first event (by iter) at or past the yardstick: {"iter", "tokens"}, or None."""
    for event in evals if y.metric == "val_loss" else scores:
        value = event.get(y.metric)
        if isinstance(value, (int, float)) and (value >= y.value if HIGHER_IS_BETTER[y.metric] else value <= y.value):
            return {"iter": event["iter"], "tokens": event.get("tokens")}
    return None


def markdown(ys: list[Yardstick], evals: list[dict], scores: list[dict]) -> list[str]:
    """The report's section: each yardstick, the run's best, and where the run first reached it."""
    names = {"val_loss": "val loss", "acc": "HellaSwag acc", "acc_norm": "HellaSwag acc_norm"}
    best = {}
    for metric, events in (("val_loss", evals), ("acc", scores), ("acc_norm", scores)):
        values = [e[metric] for e in events if isinstance(e.get(metric), (int, float))]
        best[metric] = (max if HIGHER_IS_BETTER[metric] else min)(values, default=None)
    lines = ["", "## Against GPT-2 124M", "", "| yardstick | value | this run's best | first reached |",
             "|---|---|---|---|"]
    for y in ys:
        at = first_reached(y, evals, scores)
        reached = "not yet" if at is None else f"iter {at['iter']:,}" + (
            f", {at['tokens']:,} tokens" if isinstance(at.get("tokens"), int) else "")
        value = f"{y.value:.4f}" if y.metric != "val_loss" else f"{y.value:.2f}"
        mine = "n/a" if best[y.metric] is None else f"{best[y.metric]:.4f}"
        lines.append(f"| {names[y.metric]}: {y.label} | {value} | {mine} | {reached} |")
    if not scores:
        lines += ["", "No HellaSwag scores in this run (`python -m ds_gpt.prepare --dataset hellaswag`, then "
                      "train with the set beside the data or `--hellaswag_dir`)."]
    return lines + [""]


def plot(axes, ys: list[Yardstick], evals: list[dict], scores: list[dict]) -> None:
    """Four panels: val loss and HellaSwag, against iterations and against tokens, with the yardsticks."""
    (loss_iter, loss_tokens), (hs_iter, hs_tokens) = axes
    colors = {"acc": "tab:blue", "acc_norm": "tab:red"}
    for ax, x in ((loss_iter, "iter"), (loss_tokens, "tokens")):
        pts = [(e[x], e["val_loss"]) for e in evals if isinstance(e.get(x), (int, float))
               and isinstance(e.get("val_loss"), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label="val loss")
        for k, y in enumerate(y for y in ys if y.metric == "val_loss"):
            ax.axhline(y.value, ls="--", lw=1, color=f"C{k + 2}", label=f"{y.label}: {y.value:.2f}")
        ax.set(title=f"val loss against {x}", xlabel=x, ylabel="cross-entropy")
        ax.legend(fontsize=7)
    for ax, x in ((hs_iter, "iter"), (hs_tokens, "tokens")):
        for metric, color in colors.items():
            pts = [(e[x], e[metric]) for e in scores if isinstance(e.get(x), (int, float))]
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", ms=3, color=color, label=metric)
            for y in (y for y in ys if y.metric == metric):
                ax.axhline(100 * y.value, ls="--" if "published" in y.label else ":", lw=1, color=color,
                           label=f"{metric}, {y.label}: {100 * y.value:.2f}%")
        ax.set(title=f"HellaSwag against {x}", xlabel=x, ylabel="% of items right")
        ax.legend(fontsize=7)
