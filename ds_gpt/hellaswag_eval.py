"""HellaSwag in the training loop: the set scored on every rank, with lm-evaluation-harness's numbers.

Each item's four endings are scored as the harness scores a multiple-choice request: the sum of
the log-probabilities of the ending's ids after the context (cut from the left to block_size
+ 1 ids, as the harness's HF model cuts), over GPT-2's 50257 ids (our 50304 only pad them).
`acc` counts the items whose most likely ending is the label; `acc_norm` divides each sum by
the ending's length in characters first (lm_eval/api/task.py, multiple_choice). Ties go to the
first ending, as numpy's argmax gives them.

Cost: one forward per batch of items, the four endings of an item side by side, every row padded
to the batch's longest (items go longest first: little padding, never the block size), as many
rows as a training micro-batch holds tokens at the set's longest, so memory stays what training
needs. Rank r scores items r, r + world,
...; every rank runs the same number of forwards (ZeRO-3 gathers parameters in each), and the
counts meet in one all-reduce. The forward is the engine's, in the training precision, run
eagerly: a compiled model would otherwise recompile for every new shape, and could keep a
dynamic-shape graph for training afterwards.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ds_gpt import hellaswag
from ds_gpt.config import TrainConfig
from ds_gpt.errors import UserError
from ds_gpt.hellaswag import HellaSwagSet
from ds_gpt.model import GPTConfig
from ds_gpt.tokenizer import EOT_TOKEN, VOCAB_SIZE


def hellaswag_dir(cfg: TrainConfig) -> Path:
    """--hellaswag_dir, or data/hellaswag beside the corpus (prepare's default for both)."""
    return Path(cfg.hellaswag_dir) if cfg.hellaswag_dir else Path(cfg.data_dir).parent / "hellaswag"


class Batches:
    """The set as (x, y) batches for one rank: y holds the ending's ids where they are scored and -1
    elsewhere. A rank's items go longest first, so each batch pads its rows to about its own length;
    rows per batch are fixed by the set's longest item, so memory is bounded by `tokens_per_forward`."""

    def __init__(self, hs: HellaSwagSet, block_size: int, rank: int, world_size: int, tokens_per_forward: int):
        self.hs, self.block_size = hs, block_size
        if (longest_ending := int(np.diff(hs.ending_at).max())) > block_size:  # the harness refuses it too
            raise UserError(f"a HellaSwag ending of {longest_ending} tokens does not fit block_size {block_size}",
                            hint="score HellaSwag with a longer context, or turn it off: --hellaswag_interval 0")
        inputs = [min(block_size, max(len(ids) for ids, _ in hs.rows(item)) - 1) for item in range(len(hs))]
        self.items_per_batch = max(1, tokens_per_forward // (4 * max(inputs)))
        self.items = sorted(range(rank, len(hs), world_size), key=lambda item: -inputs[item])
        self.inputs = inputs  # per item: its longest row's input length, after the cut
        per_rank = -(-len(hs) // world_size)  # the most any rank has: every rank runs as many forwards
        self.n_batches = -(-per_rank // self.items_per_batch)

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """([R, T] inputs, [R, T] targets, the batch's items); R = 4 * items_per_batch, T its longest."""
        items = self.items[b * self.items_per_batch:(b + 1) * self.items_per_batch]
        R, T = 4 * self.items_per_batch, max((self.inputs[item] for item in items), default=1)
        x = torch.full((R, T), EOT_TOKEN, dtype=torch.long)
        y = torch.full((R, T), -1, dtype=torch.long)
        for i, item in enumerate(items):
            for k, (ids, n_ending) in enumerate(self.hs.rows(item)):
                ids = torch.from_numpy(ids[-(self.block_size + 1):].astype(np.int64))  # cut from the left
                row, n = 4 * i + k, len(ids) - 1
                x[row, :n] = ids[:-1]
                y[row, n - n_ending:n] = ids[-n_ending:]
        return x, y, items


@torch.no_grad()
def ending_logprobs(forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[R] sums of log p(y) over each row's scored positions; `forward(x, y)` returns the logits first."""
    logits = forward(x, y)[0]
    scored = y >= 0
    logp = F.log_softmax(logits[scored][:, :VOCAB_SIZE].float(), dim=-1)  # GPT-2's ids only
    picked = logp.gather(1, y[scored][:, None])[:, 0].double()
    rows = scored.nonzero()[:, 0]
    return torch.zeros(len(y), dtype=torch.float64, device=y.device).index_add_(0, rows, picked)


def correct(lls: np.ndarray, ending_chars: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per item: (acc, acc_norm), 1.0 or 0.0, from [items, 4] log-likelihoods, as the harness decides."""
    acc = (np.argmax(lls, axis=1) == label).astype(float)
    acc_norm = (np.argmax(lls / ending_chars, axis=1) == label).astype(float)
    return acc, acc_norm


def score_shard(forward, batches: Batches, device: torch.device) -> tuple[list[int], np.ndarray]:
    """This rank's items and their [items, 4] log-likelihoods. A compiled engine runs eagerly here
    (the stance imports torch._dynamo, seconds on a CPU: only where the engine already has)."""
    items, lls = [], []
    compiled = getattr(forward, "is_compiled", False)  # DeepSpeedEngine.is_compiled
    with torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext():
        for b in range(batches.n_batches):
            x, y, batch_items = batches.batch(b)
            sums = ending_logprobs(forward, x.to(device), y.to(device)).cpu().numpy()
            items += batch_items
            lls.append(sums.reshape(-1, 4)[:len(batch_items)])
    return items, np.concatenate(lls) if lls else np.zeros((0, 4))


class HellaSwagEval:
    """--hellaswag_interval on a run: when it is due, and the score of the engine's model over all ranks."""

    def __init__(self, hs: HellaSwagSet, cfg: TrainConfig, interval: int, batches: Batches):
        self.hs, self.cfg, self.interval, self.batches = hs, cfg, interval, batches

    @classmethod
    def for_run(cls, cfg: TrainConfig, shape: GPTConfig, micro_batch: int, rank: int, world_size: int
                ) -> HellaSwagEval | None:
        """None when off: --hellaswag_interval 0, or left unset and no set found beside the data (or a
        model without GPT-2's vocabulary). Asked for, a missing set is an error before any rendezvous."""
        if cfg.hellaswag_interval == 0:
            return None
        asked, root = cfg.hellaswag_interval is not None, hellaswag_dir(cfg)
        if not asked and (not hellaswag.exists(root) or shape.vocab_size < VOCAB_SIZE):
            return None
        if shape.vocab_size < VOCAB_SIZE:
            raise UserError(f"--hellaswag_interval needs GPT-2's vocabulary; this model has vocab_size "
                            f"{shape.vocab_size}", hint="drop --hellaswag_interval, or train with --vocab_size 50304")
        hs = hellaswag.load(root)
        batches = Batches(hs, shape.block_size, rank, world_size, tokens_per_forward=micro_batch * shape.block_size)
        return cls(hs, cfg, cfg.hellaswag_interval if asked else cfg.eval_interval, batches)

    def due(self, iter_num: int) -> bool:
        return self.cfg.eval_due(iter_num, self.interval)

    def score(self, eng) -> dict:
        """{"items", "acc", "acc_norm", "seconds"} over the whole set (seconds: the pass's wall time, what
        it adds to the run; under --eval_only also "eval_only" and "init_from", the weights scored);
        every rank calls it."""
        from ds_gpt import collectives  # not at import: startup builds this before any process group
        from ds_gpt import engine as ds_engine

        started = time.perf_counter()
        eng.eval()
        try:
            items, lls = score_shard(eng, self.batches, ds_engine.device())
        finally:
            eng.train()
        acc, acc_norm = correct(lls, self.hs.ending_chars[items], self.hs.label[items])
        n, n_acc, n_norm = collectives.all_reduce_sum([len(items), acc.sum(), acc_norm.sum()])
        result = {"items": int(n), "acc": n_acc / n, "acc_norm": n_norm / n,
                  "seconds": round(time.perf_counter() - started, 3)}
        return {**result, "eval_only": True, "init_from": self.cfg.init_from} if self.cfg.eval_only else result
