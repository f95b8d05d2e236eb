"""GPT-2 as nanoGPT has it: one file, no distributed code, readable top to bottom.

DeepSpeed wraps this module from the outside (ds_gpt/engine.py); nothing here knows about
ranks, ZeRO or precision. The one training choice it takes is activation checkpointing
(ds_gpt.recompute), because only the model knows where its blocks are; it is an argument of GPT,
not a GPTConfig field, so GPTConfig stays nanoGPT's model_args (the shape checkpoints carry).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ds_gpt import recompute
from ds_gpt.presets import PADDED_VOCAB_SIZE


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length T
    vocab_size: int = PADDED_VOCAB_SIZE  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # 0 for pretraining, as nanoGPT
    bias: bool = True  # biases in Linear and LayerNorm, like GPT-2; False is a bit faster

    def to_dict(self) -> dict:
        return asdict(self)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's has no bias=False before 2.1 in all paths)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # x: [B, T, C]
        q, k, v = self.c_attn(x).split(C, dim=2)
        # [B, T, C] -> [B, n_head, T, head_dim]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Flash attention on GPUs that have it; a fused causal kernel on CPU.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, activation_checkpointing: str = "none"):
        """`activation_checkpointing`: "none", or "full" to recompute each block in backward."""
        super().__init__()
        if activation_checkpointing not in recompute.MODES:
            raise ValueError(f"activation_checkpointing must be one of {', '.join(recompute.MODES)}, "
                             f"got {activation_checkpointing!r}")
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the output head reuses the token embedding.
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: each residual branch adds variance,
        # so their weights shrink with depth (0.02 / sqrt(2 * n_layer)).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count as nanoGPT reports it: the position embedding is left out by default;
        the token embedding counts once, because it is tied to the output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        # idx, targets: [B, T] token ids
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = self._run_block(block, x)
        x = self.transformer.ln_f(x)
        if targets is None:
            # Inference: only the last position's logits are needed.
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)  # [B, T, vocab]
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def _run_block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing == "full" and torch.is_grad_enabled():
            # Keep only the block's input; its backward runs the block again to rebuild the rest.
            # The non-reentrant form runs ZeRO-3's parameter hooks again on the recompute, is
            # traced by torch.compile, and replays the RNG, so dropout masks match the forward's.
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def optimizer_param_groups(self, weight_decay: float, muon: dict[str, dict] | None = None) -> list[dict]:
        """nanoGPT's split: matrices and embeddings (2+ dims) decay; biases and norms do not.

        With `muon` ({"muon": {"lr", "weight_decay"}, "adam": {...}}, ds_gpt.muon.sides) the hidden
        matrices form a group of their own at the Muon side's settings, and the embeddings, gains
        and biases keep AdamW at the AdamW side's (biases and norms still without decay).
        """
        params = [p for p in self.parameters() if p.requires_grad]
        if muon is None:
            return [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ]
        hidden = {id(p) for p in self.muon_matrices()}
        adam = [p for p in params if id(p) not in hidden]
        return [
            {"params": [p for p in params if id(p) in hidden], **muon["muon"]},
            {"params": [p for p in adam if p.dim() >= 2], **muon["adam"]},
            {"params": [p for p in adam if p.dim() < 2], "lr": muon["adam"]["lr"], "weight_decay": 0.0},
        ]

    def muon_matrices(self) -> list[nn.Parameter]:
        """The hidden matrices Muon orthogonalizes: each block's attention and MLP weights.

        Muon is for maps between hidden states; the tied token embedding / output head and the
        position embedding stay on AdamW, as do all gains and biases (Jordan et al., modded-nanogpt).
        """
        # By module, not by p.dim(): under ZeRO-3 a partitioned weight looks 1-D.
        return [m.weight for m in self.transformer.h.modules() if isinstance(m, nn.Linear)]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, vocab_limit: int | None = None) -> torch.Tensor:
        """Sample `max_new_tokens` after the prompt `idx` ([B, T]).

        `vocab_limit` masks the padding ids (50257..50303) that no tokenizer can decode.
        """
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float() / max(temperature, 1e-8)
            if vocab_limit is not None and vocab_limit < logits.size(-1):
                logits[:, vocab_limit:] = -float("inf")
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx
