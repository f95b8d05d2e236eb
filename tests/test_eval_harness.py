"""lm-evaluation-harness on an exported model, offline, with no code of ours in between.

The task is tests/data/hellaswag_mini: ten multiple-choice items of our own in HellaSwag's format,
defined exactly as the harness's own `hellaswag` task but read from a local JSON-lines file. The
harness's `lm_eval run --model hf` scores the export; the test scores the same items with our GPT
directly and checks every log-likelihood and both accuracies against the harness's.
Needs the eval extra (requirements-eval.txt, `make setup EXTRAS="hf eval"`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import forked_script

from ds_gpt import tokenizer
from ds_gpt.export import export
from ds_gpt.model import GPT, GPTConfig

pytest.importorskip("lm_eval", reason="the eval extra is not installed: make setup EXTRAS=\"hf eval\"")

REPO_ROOT = Path(__file__).resolve().parent.parent
TASK_DIR = Path("tests/data/hellaswag_mini")  # relative to the repository root, as the task's data_files
TASK = "hellaswag_mini"


def our_scores(model: GPT, docs: list[dict]) -> list[list[float]]:
    """Per item, per ending: the sum of log-probabilities of the ending's tokens after the context,
    over GPT-2's 50257 ids (the vocabulary the export keeps; our 50304 only pads it). The ending
    follows one space (the harness's target delimiter), and whitespace that ends the context is
    scored with the ending, as the harness does (HellaSwag's "[title]" clean-up can leave one)."""
    from lm_eval.tasks.hellaswag.utils import preprocess  # the task's text, not its scoring

    scores = []
    for doc in docs:
        query = preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
        context, trailing = query.rstrip(), query[len(query.rstrip()):]
        context = tokenizer.encode(context)
        lls = []
        for ending in doc["endings"]:
            cont = tokenizer.encode(trailing + " " + preprocess(ending))
            idx = torch.tensor([context + cont])
            with torch.no_grad():
                logits, _ = model(idx[:, :-1], targets=idx[:, 1:])  # logits at every position
            logp = torch.log_softmax(logits[0, -len(cont):, :tokenizer.VOCAB_SIZE].double(), dim=-1)
            lls.append(logp.gather(1, torch.tensor(cont)[:, None]).sum().item())
        scores.append(lls)
    return scores


def accuracies(scores: list[list[float]], docs: list[dict]) -> tuple[list[float], list[float]]:
    """acc: the most likely ending is the label; acc_norm: the same after dividing each ending's
    log-likelihood by its length in characters (lm-eval's definition; acc_bytes would use UTF-8 bytes)."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    acc, acc_norm = [], []
    for lls, doc in zip(scores, docs, strict=True):
        lls, gold = np.array(lls), int(doc["label"])
        chars = np.array([len(preprocess(e)) for e in doc["endings"]], dtype=float)
        acc.append(float(np.argmax(lls) == gold))
        acc_norm.append(float(np.argmax(lls / chars) == gold))
    return acc, acc_norm


def lm_eval_command() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


@pytest.mark.slow
def test_harness_scores_the_export_as_we_do(tmp_path):
    torch.manual_seed(0)  # an untrained GPT-2-vocabulary model: on these items acc 0.2, acc_norm 0.1 here
    config = GPTConfig(block_size=128, vocab_size=50304, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=True)
    model = GPT(config).eval()
    dest = export(model.state_dict(), {"model_args": model.config.to_dict()}, "hf", tmp_path / "hf")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    # `python -m lm_eval run ...` in a forked process: the HF variables are read when it imports them.
    forked_script(1, lm_eval_command, "run", "--model", "hf", "--model_args", f"pretrained={dest},dtype=float32",
                  "--include_path", str(TASK_DIR), "--tasks", TASK, "--device", "cpu", "--batch_size", "8",
                  "--output_path", str(tmp_path / "eval"), "--log_samples", env=env, log_dir=tmp_path / "logs")
    (results_file,) = (tmp_path / "eval").rglob("results_*.json")
    (samples_file,) = (tmp_path / "eval").rglob(f"samples_{TASK}_*.jsonl")
    results = json.loads(results_file.read_text())["results"][TASK]
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])

    docs = [json.loads(line) for line in (REPO_ROOT / TASK_DIR / f"{TASK}.jsonl").read_text().splitlines()]
    ours = our_scores(model, docs)
    acc, acc_norm = accuracies(ours, docs)
    assert results["sample_len"] == len(samples) == len(docs) == 10
    for sample, lls, a, an in zip(samples, ours, acc, acc_norm, strict=True):
        theirs = [float(resp[0][0]) for resp in sample["resps"]]  # one [loglikelihood, is_greedy] per ending
        np.testing.assert_allclose(theirs, lls, rtol=1e-5, atol=1e-3, err_msg=f"doc {sample['doc_id']}")
        assert (sample["acc"], sample["acc_norm"]) == (a, an), sample["doc_id"]
    assert results["acc,none"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert results["acc_norm,none"] == pytest.approx(np.mean(acc_norm), abs=1e-12)
