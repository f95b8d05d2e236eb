"""HellaSwag's set (ds_gpt.hellaswag) and its scoring on ranks (ds_gpt.hellaswag_eval), in-process.

The harness's own numbers are checked in tests/test_eval_harness.py; here: both schemas give one
set, the ids are tiktoken's for the harness's strings, a damaged set is refused, and shards over
any number of ranks give the one-rank result.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import forked_train, read_jsonl, write_token_bins

from ds_gpt import hellaswag, prepare, yardsticks
from ds_gpt.config import parse_args
from ds_gpt.errors import UserError
from ds_gpt.export import export
from ds_gpt.hellaswag_eval import Batches, HellaSwagEval, correct, score_shard
from ds_gpt.model import GPT, GPTConfig
from ds_gpt.tokenizer import encode

MINI = Path(__file__).resolve().parent / "data" / "hellaswag_mini" / "hellaswag_mini.jsonl"


@pytest.fixture(scope="module")
def mini_set(tmp_path_factory) -> Path:
    """The mini items prepared by the command, as a user would (the Hub's schema: label a string)."""
    root = tmp_path_factory.mktemp("hellaswag")
    assert prepare.main(["--dataset", "hellaswag", "--data_files", str(MINI), "--out_dir", str(root / "set"),
                         "--cache_dir", str(root / "hf")]) == 0
    return root / "set"


def test_both_schemas_give_one_set_with_its_sha256(mini_set, tmp_path):
    original = tmp_path / "hellaswag_val.jsonl"  # the original jsonl: label an int, no `ind`
    original.write_text("".join(json.dumps({**{k: v for k, v in d.items() if k != "ind"}, "label": int(d["label"])})
                                + "\n" for d in read_jsonl(MINI)))
    meta = hellaswag.prepare(tmp_path / "set", [str(original)], cache_dir=str(tmp_path / "hf"))
    assert meta["items"] == 10 and meta["source"]["files"][0]["path"] == str(original)
    published = json.loads((mini_set / "meta.json").read_text())
    assert (mini_set / hellaswag.SET_FILE).read_bytes() == (tmp_path / "set" / hellaswag.SET_FILE).read_bytes()
    assert published["sha256"] == hashlib.sha256((mini_set / hellaswag.SET_FILE).read_bytes()).hexdigest()
    assert hellaswag.prepare(tmp_path / "set", [str(original)], cache_dir=str(tmp_path / "hf")) is None  # no-op


def test_ids_are_tiktokens_for_the_harness_strings(mini_set):
    hs = hellaswag.load(mini_set)
    for item, doc in enumerate(read_jsonl(MINI)):
        query, choices = hellaswag.query_and_choices(doc)
        for (ids, n_ending), choice in zip(hs.rows(item), choices, strict=True):
            assert ids.tolist() == encode(query + " " + choice)  # context + ending: the whole string's ids
            assert ids[:-n_ending].tolist() == encode(query.rstrip())
        assert hs.ending_chars[item].tolist() == [len(c) for c in choices] and hs.label[item] == int(doc["label"])
    # whitespace ending a query moves to the ending, as the harness's _encode_pair moves it
    context, ending = hellaswag.encode_pair(encode, "Cut it. ", " Done")
    assert context == encode("Cut it.") and context + ending == encode("Cut it.  Done")


def test_bad_sources_and_damaged_sets_are_refused(mini_set, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**read_jsonl(MINI)[0], "label": "7"}) + "\n")
    with pytest.raises(UserError, match="label '7'"):
        hellaswag.prepare(tmp_path / "out", [str(bad)], cache_dir=str(tmp_path / "hf"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="no file matches"):
        prepare.main(["--dataset", "hellaswag", "--data_files", str(tmp_path / "none.jsonl"),
                      "--out_dir", str(tmp_path / "out")])
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in (hellaswag.SET_FILE, hellaswag.META_FILE):
        (damaged / name).write_bytes((mini_set / name).read_bytes())
    data = bytearray((damaged / hellaswag.SET_FILE).read_bytes())
    data[100] ^= 1
    (damaged / hellaswag.SET_FILE).write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged or stale.*sha256") as err:
        hellaswag.load(damaged)
    assert "prepare --dataset hellaswag" in err.value.hint
    with pytest.raises(UserError, match="no HellaSwag set"):
        hellaswag.load(tmp_path / "nowhere")
    with pytest.raises(UserError, match="does not fit block_size 8"):  # the harness asserts it, we say it
        Batches(hellaswag.load(mini_set), 8, 0, 1, 64)


def test_shards_on_any_world_size_give_the_one_rank_result(mini_set):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=32, dropout=0.0)).eval()
    hs = hellaswag.load(mini_set)
    longest = max(len(ids) for item in range(len(hs)) for ids, _ in hs.rows(item))
    assert longest > 32 + 1  # some items are cut from the left

    def scores(world_size: int, tokens_per_forward: int) -> tuple[np.ndarray, float, float, list[int]]:
        lls, items, forwards = np.zeros((len(hs), 4)), [], []
        for rank in range(world_size):
            batches = Batches(hs, 32, rank, world_size, tokens_per_forward)
            forwards.append(batches.n_batches)
            got, shard = score_shard(model, batches, torch.device("cpu"))
            lls[got], items = shard, items + got
        assert sorted(items) == list(range(len(hs)))  # every item once
        acc, acc_norm = correct(lls, hs.ending_chars, hs.label)
        return lls, acc.mean(), acc_norm.mean(), forwards

    one, acc, acc_norm, _ = scores(1, 4 * 31)
    for world_size, tokens in ((3, 2 * 4 * 31),):  # uneven shards (4, 3, 3 items), two items per forward
        lls, a, an, forwards = scores(world_size, tokens)
        assert len(set(forwards)) == 1  # the same number of forwards on every rank (ZeRO-3 gathers in each)
        np.testing.assert_allclose(lls, one, rtol=1e-5, atol=1e-4)
        assert (a, an) == (acc, acc_norm)
    # one item by hand: the sum of the ending's log-probabilities after the left-cut context
    ids, n = hs.rows(0)[1]
    ids = torch.from_numpy(ids[-33:].astype(np.int64))
    with torch.no_grad():
        logits, _ = model(ids[None, :-1], ids[None, 1:])
    logp = torch.log_softmax(logits[0, -n:, :50257].double(), dim=-1)
    assert one[0, 1] == pytest.approx(logp.gather(1, ids[-n:, None]).sum().item(), abs=1e-3)


def test_on_by_default_only_where_a_set_is_found(mini_set, tmp_path):
    shape = GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=1, n_embd=16)
    data = str(tmp_path / "owt")
    on = HellaSwagEval.for_run(parse_args(["--data_dir", data, "--hellaswag_dir", str(mini_set)]), shape, 2, 0, 1)
    assert on is not None and on.interval == 2000 and on.due(0) and not on.due(1)
    assert HellaSwagEval.for_run(parse_args(["--data_dir", data]), shape, 2, 0, 1) is None  # no tmp/hellaswag: off
    (tmp_path / "hellaswag").symlink_to(mini_set)  # data_dir's sibling, where prepare puts it
    assert HellaSwagEval.for_run(parse_args(["--data_dir", data]), shape, 2, 0, 1) is not None
    small = GPTConfig(block_size=64, vocab_size=512, n_layer=1, n_head=1, n_embd=16)
    assert HellaSwagEval.for_run(parse_args(["--data_dir", data]), small, 2, 0, 1) is None
    with pytest.raises(UserError, match="vocabulary"):
        HellaSwagEval.for_run(parse_args(["--data_dir", data, "--hellaswag_interval", "5"]), small, 2, 0, 1)
    with pytest.raises(UserError, match="no HellaSwag set"):
        HellaSwagEval.for_run(parse_args(["--hellaswag_interval", "5", "--hellaswag_dir", str(tmp_path)]),
                              shape, 2, 0, 1)
    assert HellaSwagEval.for_run(parse_args(["--hellaswag_dir", str(mini_set), "--hellaswag_interval", "0"]),
                                 shape, 2, 0, 1) is None
    with pytest.raises(UserError, match="hellaswag_interval must be >= 0"):
        parse_args(["--hellaswag_interval", "-1"])


@pytest.mark.slow
def test_eval_only_scores_a_hf_model_and_the_report_takes_it_as_a_yardstick(mini_set, tmp_path):
    """`--eval_only --init_from DIR` (a Hugging Face GPT-2 directory, as `--init_from gpt2` loads
    OpenAI's from the Hub's cache) writes one eval and one HellaSwag line, with our scorer's numbers
    for those weights; run under a training run's directory, the report draws them as yardsticks."""
    pytest.importorskip("transformers", reason="the hf extra (make setup EXTRAS=hf)")
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=32, bias=True)).eval()
    hf_dir = export(model.state_dict(), {"model_args": model.config.to_dict()}, "hf", tmp_path / "hf")
    out = tmp_path / "run" / "reference"
    forked_train(1, "--deepspeed_config", "ds_configs/zero1.json", "--init_from", str(hf_dir), "--eval_only", "True",
                 "--data_dir", str(write_token_bins(tmp_path / "data")), "--out_dir", str(out),
                 "--hellaswag_dir", str(mini_set), "--dtype", "float32", "--compile", "False",
                 "--micro_batch_size", "2", "--gradient_accumulation_steps", "1", "--eval_iters", "1",
                 log_dir=tmp_path / "logs")
    lines = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") in (None, "hellaswag")]
    assert [sorted(r) for r in lines] == [["iter", "time", "tokens", "train_loss", "val_loss"],
                                          ["acc", "acc_norm", "eval_only", "event", "init_from", "items", "iter",
                                           "seconds", "time", "tokens"]]
    hs = hellaswag.load(mini_set)
    items, lls = score_shard(model, Batches(hs, 32, 0, 1, 4 * 32), torch.device("cpu"))
    acc, acc_norm = correct(lls, hs.ending_chars[items], hs.label[items])
    assert (lines[1]["acc"], lines[1]["acc_norm"], lines[1]["items"]) == (acc.mean(), acc_norm.mean(), 10)
    assert 0 < lines[1]["seconds"] < 60
    measured = yardsticks.measured(tmp_path / "run")
    assert [(y.metric, y.value) for y in measured] == [("acc", acc.mean()), ("acc_norm", acc_norm.mean()),
                                                       ("val_loss", lines[0]["val_loss"])]
    assert measured[0].label == f"{hf_dir}, measured"
