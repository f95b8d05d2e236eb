"""sample.py's prompt and option handling, and what its temperature and top_k mean (sampling from
real checkpoints runs in test_train.py and test_bad_paths.py)."""
from __future__ import annotations

import pytest
import torch

from ds_gpt import sample
from ds_gpt.errors import UserError
from ds_gpt.model import GPT, GPTConfig
from ds_gpt.sample import read_prompt


def test_start_text_or_file_as_nanogpt(tmp_path):
    (tmp_path / "prompt.txt").write_text("Joe Biden and Donald Trump\n", encoding="utf-8")
    assert read_prompt(f"FILE:{tmp_path / 'prompt.txt'}") == "Joe Biden and Donald Trump\n"
    assert read_prompt("ROMEO:") == "ROMEO:"
    with pytest.raises(UserError, match="missing.txt not found"):
        read_prompt(f"FILE:{tmp_path / 'missing.txt'}")


@pytest.mark.parametrize("argv, message", [
    (["--top_k", "-1"], "--top_k must be >= 1, or 0 for no limit (got -1)"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, 0 meaning greedy (got nan)"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-0.5"], "--temperature must be a finite number >= 0"),
    (["--num_samples", "0", "--max_new_tokens", "-3"],
     "--num_samples must be >= 1 (got 0); --max_new_tokens must be >= 1 (got -3)"),
    (["--seed", "-1"], "--seed must be in [0, 2**32) (got -1)"),
    (["--device", "warp9"], "--device 'warp9' is not a torch device"),
    (["--top_k", "ten"], "argument --top_k: invalid int value: 'ten'"),
    (["--start", "FILE:"], "--start FILE: names no file"),
    (["--start", "FILE:{tmp}/latin1.txt"], "latin1.txt is not UTF-8 text (invalid byte at offset 3)"),
])
def test_bad_options_are_one_error_before_any_checkpoint_is_read(tmp_path, argv, message):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(UserError) as err:  # there is no run at --out_dir: checked first, this would say so
        sample.main(["--out_dir", str(tmp_path / "no_run"), *argv])
    assert message in str(err.value)


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=32)).eval()


def test_temperature_0_is_greedy():
    model, x = tiny_model(), torch.tensor([[1, 2, 3]])
    expected = x
    for _ in range(6):  # argmax of the last position, by hand
        logits, _ = model(expected[:, -8:])
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    for seed in (0, 1):
        torch.manual_seed(seed)
        assert torch.equal(model.generate(x, 6, **sample.sampling(0.0, None)), expected)


def test_top_k_0_means_no_limit():
    model, x = tiny_model(), torch.tensor([[1, 2, 3]])
    assert sample.sampling(0.8, 0) == sample.sampling(0.8, None) == {"temperature": 0.8, "top_k": None}
    torch.manual_seed(5)
    unlimited = model.generate(x, 6, **sample.sampling(1.0, 0))
    torch.manual_seed(5)
    assert torch.equal(model.generate(x, 6, temperature=1.0, top_k=None), unlimited)
