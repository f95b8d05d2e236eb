"""GPT-2 as nanoGPT has it: parameter count, init, tying, causality, generation, param groups."""
from __future__ import annotations

import math

import torch

from ds_gpt.model import GPT, GPTConfig


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=32, **kw))


def test_gpt2_124m_parameter_count():
    # nanoGPT reports 123.69M for GPT-2 124M with the padded vocab, position embedding excluded:
    # wte 50304*768 + 12 blocks * (2 LN + attn + mlp) + ln_f (bias=True, GPT-2's own layout)
    d, L, V = 768, 12, 50304
    block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = V * d + L * block + 2 * d
    with torch.device("meta"):  # shapes only: no 500 MB of initialised weights
        model = GPT(GPTConfig())
    assert model.num_params() == expected == 123_689_472
    assert model.num_params(non_embedding=False) == expected + 1024 * d


def test_tied_embeddings_and_scaled_init():
    m = tiny()
    assert m.lm_head.weight is m.transformer.wte.weight
    std = m.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 2)) < 0.004
    assert abs(m.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.003


def test_causal_attention_future_tokens_do_not_change_past_logits():
    m = tiny().eval()
    x = torch.randint(0, 128, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 128
    logits_x, _ = m(x, x)
    logits_y, _ = m(y, y)
    assert torch.allclose(logits_x[0, :10], logits_y[0, :10], atol=1e-6)
    assert not torch.allclose(logits_x[0, 10:], logits_y[0, 10:], atol=1e-6)


def test_weight_decay_groups_split_by_dimension():
    m = tiny(bias=True)
    decay, no_decay = m.optimizer_param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_generate_extends_and_respects_vocab_limit():
    m = tiny().eval()
    out = m.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=20, temperature=1.0, top_k=50, vocab_limit=60)
    assert out.shape == (2, 23) and int(out[:, 3:].max()) < 60
    greedy = [m.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=1e-6) for _ in range(2)]
    assert torch.equal(greedy[0], greedy[1])
