"""lm-evaluation-harness on an exported model, offline, with no code of ours in between, against
our in-loop HellaSwag (ds_gpt.hellaswag, ds_gpt.hellaswag_eval) on the same checkpoint.

The task is tests/data/hellaswag_mini: ten multiple-choice items of our own in HellaSwag's format,
defined exactly as the harness's own `hellaswag` task but read from a local JSON-lines file. The
trainer scores the items in its loop on two ranks (metrics.jsonl's hellaswag line), the run's
checkpoint is exported, and the harness's `lm_eval run --model hf` scores the export: every
log-likelihood and both accuracies must be the harness's.
Needs the eval extra (requirements-eval.txt, `make setup EXTRAS="hf eval"`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import forked_script, forked_train, read_jsonl, write_token_bins

from ds_gpt import hellaswag
from ds_gpt.checkpoint import load_fp32_state_dict
from ds_gpt.export import export
from ds_gpt.hellaswag_eval import Batches, correct, score_shard
from ds_gpt.model import GPT, GPTConfig

pytest.importorskip("lm_eval", reason="the eval extra is not installed: make setup EXTRAS=\"hf eval\"")

REPO_ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = Path("tests/data/hellaswag_mini")  # relative to the repository root, as the task's data_files
TASK = "hellaswag_mini"


def lm_eval_command() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


def test_our_copy_of_the_harness_text_is_the_harness(tmp_path):
    """ds_gpt.hellaswag copies the harness's preprocess (the harness is an optional extra): same
    queries and choices on the mini items and on the strings its clean-up exists for."""
    import datasets
    from lm_eval.tasks.hellaswag import utils

    docs = read_jsonl(REPO_ROOT / TASK_DIR / f"{TASK}.jsonl")
    theirs = utils.process_docs(datasets.Dataset.from_list(docs))
    for doc, processed in zip(docs, theirs, strict=True):
        assert hellaswag.query_and_choices(doc) == (processed["query"], processed["choices"])
    for text in ["  How to tie a tie [title] Cross the wide end. [step] Pull it  up [header] ", "[x]", "a  b   c"]:
        assert hellaswag.preprocess(text) == utils.preprocess(text)


@pytest.mark.slow
def test_harness_scores_the_export_as_our_training_loop_does(tmp_path):
    """Two ranks train a GPT-2-vocabulary model (2 layers, d=64, block 32: most items are cut
    from the left, in both) for 2 iterations, scoring HellaSwag in the loop; the harness then
    scores the export of the final checkpoint."""
    hellaswag.prepare(tmp_path / "hellaswag", [str(REPO_ROOT / TASK_DIR / f"{TASK}.jsonl")],
                      cache_dir=str(tmp_path / "hf_datasets"))
    data, out = write_token_bins(tmp_path / "data"), tmp_path / "out"
    forked_train(2, "--deepspeed_config", "ds_configs/zero3.json", "--data_dir", str(data), "--out_dir", str(out),
                 "--hellaswag_dir", str(tmp_path / "hellaswag"), "--n_layer", "2", "--n_head", "2", "--n_embd", "64",
                 "--block_size", "32", "--vocab_size", "50304", "--bias", "True", "--dtype", "float32",
                 "--compile", "False", "--micro_batch_size", "2", "--gradient_accumulation_steps", "1",
                 "--max_iters", "2", "--eval_iters", "1", "--learning_rate", "1e-2", "--warmup_iters", "0",
                 log_dir=tmp_path / "logs")
    in_loop = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "hellaswag"]
    assert [r["iter"] for r in in_loop] == [0, 2] and in_loop[-1]["items"] == 10  # default: with every eval
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events_file,) = (out / "tb").rglob("events.out.tfevents.*")  # rank 0's, through DeepSpeed's monitor
    tb = EventAccumulator(str(events_file))
    tb.Reload()
    for metric in ("acc", "acc_norm"):
        scalars = tb.Scalars(f"hellaswag/{metric}")
        assert [e.step for e in scalars] == [0, 2]
        assert [e.value for e in scalars] == pytest.approx([r[metric] for r in in_loop], abs=1e-6)
    state_dict, client = load_fp32_state_dict(out)
    dest = export(state_dict, client, "hf", tmp_path / "hf")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    # `python -m lm_eval run ...` in a forked process: the HF variables are read when it imports them.
    forked_script(1, lm_eval_command, "run", "--model", "hf", "--model_args", f"pretrained={dest},dtype=float32",
                  "--include_path", str(TASK_DIR), "--tasks", TASK, "--device", "cpu", "--batch_size", "8",
                  "--output_path", str(tmp_path / "eval"), "--log_samples", env=env, log_dir=tmp_path / "logs")
    (results_file,) = (tmp_path / "eval").rglob("results_*.json")
    (samples_file,) = (tmp_path / "eval").rglob(f"samples_{TASK}_*.jsonl")
    results = json.loads(results_file.read_text())["results"][TASK]
    samples = sorted(read_jsonl(samples_file), key=lambda s: s["doc_id"])

    # the training loop's figure is the harness's
    assert results["sample_len"] == len(samples) == 10
    assert in_loop[-1]["acc"] == pytest.approx(results["acc,none"], abs=1e-12)
    assert in_loop[-1]["acc_norm"] == pytest.approx(results["acc_norm,none"], abs=1e-12)
    # and so is every log-likelihood and per-item decision our scorer makes on the same weights
    model = GPT(GPTConfig(**client["model_args"])).eval()
    model.load_state_dict(state_dict)
    hs = hellaswag.load(tmp_path / "hellaswag")
    items, lls = score_shard(model, Batches(hs, 32, rank=0, world_size=1, tokens_per_forward=3 * 4 * 32),
                             torch.device("cpu"))
    order = np.argsort(items)  # a rank scores its items longest first
    items, lls = [items[k] for k in order], lls[order]
    acc, acc_norm = correct(lls, hs.ending_chars[items], hs.label[items])
    assert items == list(range(10))
    for sample, ours, a, an in zip(samples, lls, acc, acc_norm, strict=True):
        theirs = [float(resp[0][0]) for resp in sample["resps"]]  # one [loglikelihood, is_greedy] per ending
        np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-3, err_msg=f"doc {sample['doc_id']}")
        assert (sample["acc"], sample["acc_norm"]) == (a, an), sample["doc_id"]
    assert in_loop[-1]["acc"] == pytest.approx(acc.mean(), abs=1e-12)
