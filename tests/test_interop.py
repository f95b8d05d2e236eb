"""Interop: nanoGPT ckpt.pt and Hugging Face GPT-2 in and out (fp32, CPU, tiny models).

Reference implementations are the real ones: transformers' GPT2LMHeadModel (the optional extra,
requirements-hf.txt) and nanoGPT's loading code, reproduced below as its sample.py has it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import forked_background_train, forked_train, free_port

from ds_gpt import hf_tokenizer, tokenizer
from ds_gpt.errors import UserError
from ds_gpt.export import export, load_export
from ds_gpt.interop import load_init_weights
from ds_gpt.model import GPT, GPTConfig
from ds_gpt.optimizer_state import apply_nanogpt_optimizer_state, nanogpt_param_names

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = dict(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=True)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # non-trivial biases and norms, so a mapping mistake shows in the logits
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def batch(vocab: int, seed: int = 1, B: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def our_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(idx, targets=idx)  # targets: logits at every position
    return logits


def hf_logits(model_dir: Path, idx: torch.Tensor) -> torch.Tensor:
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(idx).logits


def client_state(model: GPT, **extra) -> dict:
    return {"model_args": model.config.to_dict(), "iter_num": 7, "best_val_loss": 2.5, **extra}


# ---------------------------------------------------------------------------------------------
# Hugging Face out and in


@pytest.mark.parametrize("overrides,hf_vocab,want_vocab", [
    ({}, None, 128), ({"vocab_size": 160}, 128, 128), ({"vocab_size": 50304}, None, 50257),
    ({"bias": False}, None, 128),
], ids=["same-vocab", "trimmed-vocab", "gpt2-padded-vocab", "no-bias"])
def test_hf_export_gives_our_logits(tmp_path, overrides, hf_vocab, want_vocab):
    model = tiny_gpt(**overrides)
    dest = export(model.state_dict(), client_state(model), "hf", tmp_path / "hf", hf_vocab_size=hf_vocab)
    tokenizer_files = list(hf_tokenizer.FILES) if want_vocab == 50257 else []  # only GPT-2's vocabulary has one
    assert sorted(p.name for p in dest.iterdir()) == sorted(["config.json", "model.safetensors", *tokenizer_files])
    idx = batch(want_vocab)
    ours, theirs = our_logits(model, idx), hf_logits(dest, idx)
    assert theirs.shape[-1] == want_vocab
    torch.testing.assert_close(theirs, ours[..., :theirs.shape[-1]], atol=1e-4, rtol=0)


# The reference run's test sentence and its GPT-2 ids.
REFERENCE_TEXT = "About the author: OBACK2KENYA is"
REFERENCE_IDS = [8585, 262, 1772, 25, 25334, 8120, 17, 43959, 44947, 318]
VARIED_TEXT = ("Héllo wörld 🤖 — naïve café, 日本語 and עברית\n\n\n   three spaces\t\ttabs\r\nCRLF "
               "1234567890 it's we'll THEY'RE don't  \u00a0nbsp  trailing   ")


def test_hf_export_carries_gpt2_tokenizer(tmp_path):
    """AutoTokenizer on the export is GPT-2's: the ids of ds_gpt.tokenizer, not an empty vocabulary."""
    from transformers import AutoTokenizer

    model = tiny_gpt(vocab_size=50304)
    dest = export(model.state_dict(), client_state(model), "hf", tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(dest, local_files_only=True)
    assert hf(REFERENCE_TEXT)["input_ids"] == REFERENCE_IDS
    for text in (VARIED_TEXT, " " * 7, "\n", "a" * 300, "".join(map(chr, range(32, 0x250)))):
        assert hf.encode(text) == tokenizer.encode(text), text
        assert hf.decode(hf.encode(text)) == text
    # Like OpenAI's GPT-2 on the Hub (and unlike encode_ordinary), the text "<|endoftext|>" is the token.
    text = "end<|endoftext|>next"
    assert hf.encode(text) == tokenizer.get_encoding().encode(text, allowed_special="all")
    assert (hf.eos_token_id, hf.bos_token_id, hf.model_max_length) == (50256, 50256, TINY["block_size"])
    merges = (dest / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(merges) == 1 + 50000 and merges[1:3] == ["Ġ t", "Ġ a"]  # GPT-2's merges.txt: header, 50000 rules


def save_random_hf_gpt2(path: Path, vocab: int = 100, activation: str = "gelu") -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=64, n_layer=2, n_head=2,
                     activation_function=activation, bos_token_id=None, eos_token_id=None)
    hf = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(path)


@pytest.mark.parametrize("activation,atol", [("gelu", 1e-4), ("gelu_new", 2e-3)])
def test_local_hf_dir_loads_with_transformers_logits(tmp_path, activation, atol):
    save_random_hf_gpt2(tmp_path / "hf", activation=activation)
    init = load_init_weights(str(tmp_path / "hf"), vocab_size=128)  # 100 padded to 128
    assert init.model_args == dict(TINY, vocab_size=128)
    assert init.iter_num == 0 and init.optimizer_state is None
    model = GPT(GPTConfig(**init.model_args)).eval()
    model.load_state_dict(init.state_dict)  # strict: every key, every shape
    idx = batch(100)
    ours, theirs = our_logits(model, idx), hf_logits(tmp_path / "hf", idx)
    # gelu_new (OpenAI's tanh GELU) runs as the exact GELU here, as in nanoGPT: close, not equal.
    torch.testing.assert_close(ours[..., :100], theirs, atol=atol, rtol=0)
    # Padding rows are the mean embedding: their logit is the mean of the real ones, never 0.
    torch.testing.assert_close(ours[..., 100:], theirs.mean(-1, keepdim=True).expand(-1, -1, 28), atol=1e-4, rtol=0)


def load_gpt2_by_name() -> None:
    """`--init_from gpt2`'s loader as a command would run it (a forked process: HF_HUB_OFFLINE is read at import)."""
    from ds_gpt.errors import run_cli
    from ds_gpt.interop import load_init_weights

    run_cli(lambda: load_init_weights("gpt2") and 0, prog="t")


@pytest.mark.slow  # a forked rank importing transformers, ~2.5 s
def test_openai_name_offline_says_how_to_get_it(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    with forked_background_train(1, log_dir=tmp_path / "logs", env=env, entry=load_gpt2_by_name) as process:
        process.wait(120)
    assert process.returncode == 2, process.output()
    lines = [line for line in process.output().splitlines() if line.strip()]
    assert lines[-1].startswith("t: error: cannot load GPT-2 weights 'gpt2'") and "--init_from DIR)" in lines[-1]
    assert sum("error:" in line for line in lines) == 1, lines  # one line, though transformers' message has several


def test_without_transformers_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets when absent
    (tmp_path / "hf").mkdir()
    with pytest.raises(UserError, match="transformers") as err:
        load_init_weights(str(tmp_path / "hf"))
    assert "make setup EXTRAS=hf" in str(err.value)


# ---------------------------------------------------------------------------------------------
# nanoGPT in and out


def nanogpt_adamw(model: GPT) -> torch.optim.AdamW:
    """nanoGPT's configure_optimizers: decay (dim >= 2) then no-decay, named_parameters order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95))


def train_steps(model: GPT, opt: torch.optim.Optimizer, n: int, seed: int = 5) -> None:
    model.train()
    for i in range(n):
        idx = batch(model.config.vocab_size, seed=seed + i, T=32)
        _, loss = model(idx[:, :-1], targets=idx[:, 1:].contiguous())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def write_nanogpt_ckpt(path: Path, model: GPT, opt: torch.optim.Optimizer, iter_num: int = 2) -> dict:
    """A ckpt.pt as nanoGPT's train.py writes it from a torch.compile'd, non-flash model."""
    sd = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    T = model.config.block_size
    for i in range(model.config.n_layer):  # non-flash CausalSelfAttention's causal-mask buffer
        sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    ckpt = {"model": sd, "optimizer": opt.state_dict(), "model_args": model.config.to_dict(),
            "iter_num": iter_num, "best_val_loss": torch.tensor(3.25), "config": {"learning_rate": 1e-2}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return ckpt


def nanogpt_load(ckpt_path: Path) -> GPT:
    """nanoGPT's sample.py, verbatim in logic: GPTConfig(**model_args), strip, strict load."""
    checkpoint = torch.load(ckpt_path, map_location="cpu")  # weights_only=True: torch's default
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    state_dict = checkpoint["model"]
    unwanted_prefix = "_orig_mod."
    for k in list(state_dict):
        if k.startswith(unwanted_prefix):
            state_dict[k[len(unwanted_prefix):]] = state_dict.pop(k)
    model.load_state_dict(state_dict)
    return model


def test_nanogpt_to_ours_to_nanogpt_is_bitwise(tmp_path):
    src = tiny_gpt()
    opt = nanogpt_adamw(src)
    train_steps(src, opt, 2)
    original = write_nanogpt_ckpt(tmp_path / "ng" / "ckpt.pt", src, opt)

    init = load_init_weights(f"nanogpt:{tmp_path / 'ng' / 'ckpt.pt'}")
    assert init.model_args == src.config.to_dict()
    assert (init.iter_num, init.best_val_loss) == (2, 3.25)
    assert init.optimizer_state["param_groups"][0]["params"] == original["optimizer"]["param_groups"][0]["params"]
    ours = GPT(GPTConfig(**init.model_args))
    ours.load_state_dict(init.state_dict)
    assert ours.lm_head.weight is ours.transformer.wte.weight

    dest = export(ours.state_dict(), {"model_args": init.model_args, "iter_num": init.iter_num,
                                      "best_val_loss": init.best_val_loss}, "nanogpt", tmp_path / "back")
    back = torch.load(dest / "ckpt.pt", map_location="cpu", weights_only=True)
    assert set(back) == {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert (back["iter_num"], back["best_val_loss"], back["model_args"]) == (2, 3.25, src.config.to_dict())
    want = {k.removeprefix("_orig_mod."): v for k, v in original["model"].items() if not k.endswith(".attn.bias")}
    assert set(back["model"]) == set(want)
    for k, v in want.items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v), k

    reloaded = nanogpt_load(dest / "ckpt.pt")  # nanoGPT's own loading path, strict
    idx = batch(src.config.vocab_size)
    assert torch.equal(our_logits(reloaded, idx), our_logits(src, idx))
    nanogpt_adamw(reloaded).load_state_dict(back["optimizer"])  # its train.py resume step


def nanogpt_run_and_its_resume(tmp_path: Path) -> tuple[GPT, GPT, dict]:
    """nanoGPT trains 3 steps, saves, and goes on for a 4th step (the reference); and our model
    loaded from that ckpt.pt, with the optimizer state it holds, ready for the 4th step."""
    ref = tiny_gpt()
    ref_opt = nanogpt_adamw(ref)
    train_steps(ref, ref_opt, 3)
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", ref, ref_opt, iter_num=3)
    train_steps(ref, ref_opt, 1, seed=100)
    init = load_init_weights(f"nanogpt:{tmp_path / 'ckpt.pt'}")
    assert init.iter_num == 3
    model = GPT(GPTConfig(**init.model_args))
    model.load_state_dict(init.state_dict)
    return ref, model, init.optimizer_state


def test_nanogpt_optimizer_state_continues_the_run(tmp_path):
    ref, model, optimizer_state = nanogpt_run_and_its_resume(tmp_path)
    opt = torch.optim.AdamW(model.optimizer_param_groups(0.1), lr=1e-2, betas=(0.9, 0.95))
    apply_nanogpt_optimizer_state(opt, model, optimizer_state)
    train_steps(model, opt, 1, seed=100)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_nanogpt_param_order_is_nanogpts():
    names = nanogpt_param_names(tiny_gpt())
    assert names[:3] == ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight"]
    assert "lm_head.weight" not in names and names[-1] == "transformer.ln_f.bias"


# ---------------------------------------------------------------------------------------------
# mismatches say what differs


def test_inconsistent_nanogpt_checkpoint_is_named(tmp_path):
    model = tiny_gpt()
    ckpt = write_nanogpt_ckpt(tmp_path / "ckpt.pt", model, nanogpt_adamw(model))
    ckpt["model_args"]["vocab_size"] = 50304  # the args say one vocab, the tensors another
    ckpt["model_args"]["bias"] = False
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(UserError) as err:
        load_init_weights(f"nanogpt:{tmp_path / 'bad.pt'}")
    assert "transformer.wte.weight has shape (128, 64), model_args imply (50304, 64)" in str(err.value)
    assert "unexpected transformer.h.0.ln_1.bias" in str(err.value)
    with pytest.raises(UserError, match="no nanoGPT checkpoint"):
        load_init_weights(f"nanogpt:{tmp_path / 'missing.pt'}")
    with pytest.raises(UserError, match="not a known source"):
        load_init_weights("gpt3")


def test_optimizer_state_of_another_model_is_refused(tmp_path):
    other = tiny_gpt(n_layer=1)
    write_nanogpt_ckpt(tmp_path / "ckpt.pt", other, nanogpt_adamw(other))
    state = load_init_weights(f"nanogpt:{tmp_path / 'ckpt.pt'}").optimizer_state
    model = tiny_gpt()
    with pytest.raises(UserError, match=r"groups of \[6, 10\] parameters; this model needs \[10, 18\]"):
        apply_nanogpt_optimizer_state(torch.optim.AdamW(model.parameters()), model, state)


def test_export_never_clobbers_without_force(tmp_path):
    model = tiny_gpt()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export(model.state_dict(), client_state(model), "fp32", dest)
    assert (dest / "keep.txt").read_text() == "mine"
    export(model.state_dict(), client_state(model), "fp32", dest, force=True)
    assert sorted(p.name for p in dest.iterdir()) == ["model.pt", "model_args.json", "train_state.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    loaded = GPT(GPTConfig(**json.loads((dest / "model_args.json").read_text())))  # the file is GPTConfig's
    loaded.load_state_dict(torch.load(dest / "model.pt", weights_only=True))
    idx = batch(128)
    assert torch.equal(our_logits(loaded, idx), our_logits(model, idx))
    assert json.loads((dest / "train_state.json").read_text()) == {"iter_num": 7, "best_val_loss": 2.5}


def test_load_export_gives_a_ready_gpt_from_fp32_and_nanogpt_exports(tmp_path):
    model, idx = tiny_gpt(seed=3), batch(128)
    for fmt in ("fp32", "nanogpt"):
        export(model.state_dict(), client_state(model), fmt, tmp_path / fmt)
        loaded = load_export(tmp_path / fmt)
        assert not loaded.training and torch.equal(our_logits(loaded, idx), our_logits(model, idx)), fmt
    nested = tmp_path / "fp32" / "model_args.json"  # the layout fp32 exports had before
    nested.write_text(json.dumps({"model_args": TINY, "iter_num": 7}))
    assert torch.equal(our_logits(load_export(tmp_path / "fp32"), idx), our_logits(model, idx))
    with pytest.raises(UserError, match="holds no fp32 export") as err:
        load_export(tmp_path)
    assert "--format fp32" in err.value.hint


# ---------------------------------------------------------------------------------------------
# through a real DeepSpeed engine (one process, fp32, CPU)


@pytest.fixture
def ds_env(monkeypatch):
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def ds_engine(model: GPT, stage: int, bf16: bool = False):
    import deepspeed

    config = {"bf16": {"enabled": bf16}, "train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
              "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "torch_adam": True}},
              "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0}  # DeepSpeed clips at 1.0 by default
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.optimizer_param_groups(0.1), config=config)
    return engine


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_nanogpt_optimizer_state_in_deepspeed(tmp_path, ds_env, stage):
    ref, model, optimizer_state = nanogpt_run_and_its_resume(tmp_path)
    engine = ds_engine(model, stage)
    apply_nanogpt_optimizer_state(engine.optimizer, model, optimizer_state)
    idx = batch(model.config.vocab_size, seed=100, T=32)
    _, loss = engine(idx[:, :-1], targets=idx[:, 1:].contiguous())
    engine.backward(loss)
    engine.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_nanogpt_optimizer_state_in_deepspeed_bf16(tmp_path, ds_env, stage):
    """bf16 keeps fp32 masters in DeepSpeed's wrappers: the moments must land there."""
    from deepspeed.utils import safe_get_full_optimizer_state

    _, model, optimizer_state = nanogpt_run_and_its_resume(tmp_path)
    name = "transformer.h.0.mlp.c_fc.weight"
    fp32 = GPT(model.config)
    fp32.load_state_dict(model.state_dict())
    idx = batch(model.config.vocab_size, seed=100, T=32)
    _, loss = fp32(idx[:, :-1], targets=idx[:, 1:].contiguous())
    loss.backward()
    grad = dict(fp32.named_parameters())[name].grad
    saved = optimizer_state["state"][nanogpt_param_names(model).index(name)]["exp_avg"]

    engine = ds_engine(model, stage, bf16=True)
    apply_nanogpt_optimizer_state(engine.optimizer, model, optimizer_state)
    _, loss = engine(idx[:, :-1], targets=idx[:, 1:].contiguous())
    engine.backward(loss)
    engine.step()
    p = dict(model.named_parameters())[name]
    if stage:
        exp_avg = safe_get_full_optimizer_state(p, "exp_avg")
    else:  # unfused wrapper: per-parameter fp32 masters
        opt = engine.optimizer
        master = [hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
                  for lp, hp in zip(lps, hps, strict=True) if lp is p][0]
        exp_avg = opt.optimizer.state[master]["exp_avg"]
    want = 0.9 * saved + 0.1 * grad  # Adam's first moment after one more step from the saved one
    assert (exp_avg - want).norm() / want.norm() < 0.02  # bf16 gradients; a fresh moment is off by ~0.3


@pytest.mark.slow
def test_export_cli_from_deepspeed_checkpoint(tmp_path, ds_env):
    """nanoGPT -> a ZeRO-2 DeepSpeed checkpoint -> `python -m ds_gpt.export` in every format."""
    from ds_gpt import checkpoint
    from ds_gpt import export as export_cmd
    from ds_gpt.collectives import Collectives

    src = tiny_gpt()
    original = write_nanogpt_ckpt(tmp_path / "ng" / "ckpt.pt", src, nanogpt_adamw(src), iter_num=11)
    init = load_init_weights(f"nanogpt:{tmp_path / 'ng' / 'ckpt.pt'}")
    model = GPT(GPTConfig(**init.model_args))
    model.load_state_dict(init.state_dict)
    engine = ds_engine(model, stage=2)
    out = tmp_path / "run"
    one_rank = Collectives(all_reduce_sum=lambda xs: xs, barrier=lambda: None, all_gather_object=lambda obj: [obj])
    checkpoint.Checkpointer(
        engine, out, rank=0, world_size=1, collectives=one_rank, interval=1, keep_last=1, milestones=set(),
        milestone_every=0, client_state=lambda: {"model_args": init.model_args, "iter_num": 11, "best_val_loss": 3.25},
        marker={"model_args": init.model_args, "world_size": 1, "zero_stage": 2, "dtype": "float32"}).save(11)

    def run_export(fmt: str, *extra: str) -> int:
        """The export command's main() in this process; the last case runs the command itself."""
        return export_cmd.main(["--out_dir", str(out), "--format", fmt, "--dest", str(tmp_path / fmt), *extra])

    assert run_export("nanogpt") == 0
    back = torch.load(tmp_path / "nanogpt" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert back["iter_num"] == 11 and back["model_args"] == init.model_args
    for k, v in original["model"].items():
        if not k.endswith(".attn.bias"):
            assert torch.equal(back["model"][k.removeprefix("_orig_mod.")], v), k
    nanogpt_load(tmp_path / "nanogpt" / "ckpt.pt")

    assert run_export("hf") == 0
    idx = batch(128)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", idx), our_logits(src, idx), atol=1e-4, rtol=0)

    assert run_export("fp32", "--tag", "global_step11") == 0
    fp32 = torch.load(tmp_path / "fp32" / "model.pt", weights_only=True)
    assert all(torch.equal(fp32[k], v) for k, v in src.state_dict().items())

    r = subprocess.run([sys.executable, "-m", "ds_gpt.export", "--out_dir", str(out), "--format", "fp32",
                        "--dest", str(tmp_path / "fp32")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not empty" in r.stderr and "--force" in r.stderr  # DEST is now non-empty


@pytest.mark.slow
def test_trainer_starts_from_nanogpt_and_hf_checkpoints(tmp_path):
    """`python -m ds_gpt.train --init_from ...` end to end: the shape is adopted, the weights arrive
    exactly (lr 0 keeps them), and with --resume_optimizer the iteration count continues."""
    import json

    from helpers import read_jsonl, write_token_bins

    from ds_gpt.checkpoint import load_fp32_state_dict

    data = write_token_bins(tmp_path / "data", vocab=100)
    src = tiny_gpt()
    opt = nanogpt_adamw(src)
    train_steps(src, opt, 2)
    write_nanogpt_ckpt(tmp_path / "ng" / "ckpt.pt", src, opt, iter_num=2)
    save_random_hf_gpt2(tmp_path / "hf", vocab=100)
    common = ["--data_dir", str(data), "--dtype", "float32",
              "--compile", "False", "--micro_batch_size", "2", "--gradient_accumulation_steps", "1",
              "--eval_interval", "100", "--eval_iters", "1", "--log_interval", "1", "--learning_rate", "0"]
    cases = {"ng": ([f"--init_from=nanogpt:{tmp_path / 'ng' / 'ckpt.pt'}", "--resume_optimizer", "True",
                     "--max_iters", "4"],
                    f"nanogpt:{tmp_path / 'ng' / 'ckpt.pt'}", [2, 3]),
             "hf": ([f"--init_from={tmp_path / 'hf'}", "--max_iters", "2"], str(tmp_path / "hf"), [0, 1])}
    for name, (args, spec, iters) in cases.items():
        out = tmp_path / f"out_{name}"
        forked_train(1, *common, "--out_dir", str(out), *args, log_dir=tmp_path / f"{name}.logs")
        expected = load_init_weights(spec)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model"] == {**expected.model_args, "dropout": 0.0}, name
        assert [e["iter"] for e in read_jsonl(out / "metrics.jsonl") if "loss" in e and "event" not in e] == iters
        trained, _ = load_fp32_state_dict(out)
        for key, tensor in expected.state_dict.items():
            assert torch.equal(trained[key], tensor), (name, key)


@pytest.mark.slow
def test_hf_export_generates_as_our_sampler(tmp_path, shakespeare_data, capsys):
    """A model trained by ds_gpt.train, exported by the export command, run by transformers'
    text-generation pipeline with greedy decoding: the same tokens and text as
    `python -m ds_gpt.sample --temperature 0` gives from the same checkpoint."""
    from transformers import pipeline

    from ds_gpt import export as export_cmd
    from ds_gpt import sample as sample_cmd

    out = tmp_path / "run"
    train = ["--deepspeed_config", "ds_configs/zero1.json",
             "--data_dir", str(shakespeare_data), "--out_dir", str(out), "--n_layer", "1", "--n_head", "2",
             "--n_embd", "32", "--block_size", "64", "--vocab_size", "50304", "--dtype", "float32",
             "--compile", "False", "--micro_batch_size", "4", "--gradient_accumulation_steps", "1",
             "--max_iters", "3", "--warmup_iters", "1", "--learning_rate", "1e-2", "--eval_iters", "1"]
    forked_train(1, *train, log_dir=tmp_path / "logs")
    # Both commands in-process (their main()): the same code paths, without two more interpreter start-ups.
    assert export_cmd.main(["--out_dir", str(out), "--format", "hf", "--dest", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert sample_cmd.main(["--out_dir", str(out), "--start", REFERENCE_TEXT, "--temperature", "0",
                            "--max_new_tokens", "20", "--device", "cpu"]) == 0
    ours = capsys.readouterr().out.split(f"# {out} at iteration 3\n", 1)[1].split("\n---------------\n")[0]

    pipe = pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    ids = pipe(REFERENCE_TEXT, max_new_tokens=20, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    text = pipe(REFERENCE_TEXT, max_new_tokens=20, do_sample=False)[0]["generated_text"]
    assert ids[:10] == REFERENCE_IDS and len(ids) == 30
    assert tokenizer.decode(ids) == ours and text == ours


def test_exports_follow_the_umask_like_every_written_file(tmp_path):
    """A lab shares an export by its umask: every format's directory and files get what mkdir and
    touch would give them (not the 0755 once forced on the directory, nor safetensors' own 0600)."""
    model, mask = tiny_gpt(), 0o027
    old = os.umask(mask)
    try:
        for fmt in ("fp32", "hf", "nanogpt"):
            export(model.state_dict(), client_state(model), fmt, tmp_path / fmt)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes == {**{d: 0o777 & ~mask for d in ("fp32", "hf", "nanogpt")},
                     **{f: 0o666 & ~mask for f in ("fp32/model.pt", "fp32/model_args.json", "fp32/train_state.json",
                                                   "hf/config.json", "hf/model.safetensors", "nanogpt/ckpt.pt")}}


@pytest.mark.parametrize("dest", ["out", "out/global_step4", "out/exports/hf", "."])
def test_export_force_never_replaces_the_run(tiny_run, tmp_path, capsys, dest):
    """--dest the run directory, a tag, anything inside it or above it: refused, --force or not."""
    from fs_faults import snapshot

    from ds_gpt import export as export_cmd
    from ds_gpt.errors import run_cli

    shutil.copytree(tiny_run / "out", tmp_path / "out")
    before = snapshot(tmp_path)
    argv = ["--out_dir", str(tmp_path / "out"), "--format", "fp32", "--dest", str(tmp_path / dest), "--force"]
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: export_cmd.main(argv), prog="ds_gpt.export")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "the run directory" in err[0] and "HINT:" in err[0], err
    assert snapshot(tmp_path) == before
