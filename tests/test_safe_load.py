"""No file we read can run code: a planted pickle at every entry point that loads one.

Each case plants, in a copy of one real tiny run (the tiny_run fixture), a file whose
unpickling would create CANARY (`__reduce__` -> open(CANARY, "w")), keeping the rest of the
file's content as DeepSpeed wrote it, and updates the completion marker's size and sha256 for
it, so that the checksums are not what stops the attack. Every command must end with exit 2
and one error line, no traceback, and no CANARY. Commands run in this process (their main(),
through run_cli) where the refusal comes before any process group; the trainer's own loads
after the engine is built (DeepSpeed's load_checkpoint, the RNG files, the layout-free form)
run in forked ranks.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import forked_train, tiny_run_args

from ds_gpt import elastic, export, safe_load, sample, train
from ds_gpt.checkpoint import MARKER
from ds_gpt.errors import UserError, run_cli
from ds_gpt.fileset import file_digest

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
REFUSED = "holds more than tensors and plain data (Unsupported global: GLOBAL io.open)"


class Payload:
    """What an attacker would plant: reading it back calls open(path, "w"), creating the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant(path: Path, canary: Path, content: object = None) -> None:
    """Replace `path` with its own content (or `content`) plus a payload; re-vouch for it in its
    tag's completion marker, if the marker lists it."""
    if content is None:
        content = safe_load.load(path)
    torch.save({**content, "extra": Payload(canary)}, path)
    for tag_dir in (path.parent, path.parent.parent):
        marker_path = tag_dir / MARKER
        if marker_path.exists():
            marker = json.loads(marker_path.read_text())
            name = str(path.relative_to(tag_dir))
            if name in marker.get("files", {}):
                marker["files"][name] = file_digest(path)
                marker_path.write_text(json.dumps(marker))


def run_command(main, argv: list[str], capsys) -> tuple[int, list[str]]:
    """A command's main() as `python -m ds_gpt.X` runs it (run_cli): its exit code and stderr lines."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(argv), prog="ds_gpt.cmd")
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return exit_.value.code, [line for line in err.splitlines() if line.strip() and "warning" not in line]


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private copy of the tiny run (ROOT/data, ROOT/out)."""
    shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("logs"))
    return tmp_path / "run"


def assert_refused(code: int, lines: list[str], canary: Path) -> None:
    assert not canary.exists(), "the planted pickle ran"
    assert code == 2 and len(lines) == 1 and "error:" in lines[0], lines
    assert REFUSED in lines[0] and "HINT:" in lines[0], lines[0]


# --- commands that read a checkpoint before any process group exists ---------------------------

READERS = {
    "sample": lambda out: (sample.main, ["--out_dir", str(out), "--start", "!", "--max_new_tokens", "2"]),
    **{f"export {fmt}": (lambda out, fmt=fmt: (export.main, ["--out_dir", str(out), "--format", fmt,
                                                            "--dest", str(out.parent / fmt)]))
       for fmt in export.FORMATS},
}


@pytest.mark.parametrize("planted", [MODEL_STATES, OPTIM_STATES])  # ours; DeepSpeed's zero_to_fp32
@pytest.mark.parametrize("command", list(READERS))
def test_sample_and_export_refuse_a_planted_pickle(run, tmp_path, capsys, command, planted):
    canary = tmp_path / "canary"
    plant(run / "out" / "global_step4" / planted, canary)
    main, argv = READERS[command](run / "out")
    assert_refused(*run_command(main, argv, capsys), canary)


def trainer(run: Path, out: Path, *extra: str, zero_stage: int = 1) -> list[str]:
    return [*tiny_run_args(run, out, zero_stage), "--max_iters", "6", *extra]


def test_weights_from_a_run_refuse_a_planted_pickle(run, tmp_path, capsys):
    canary = tmp_path / "canary"
    plant(run / "out" / "global_step4" / OPTIM_STATES, canary)
    argv = trainer(run, tmp_path / "new", f"--init_from=weights:{run / 'out'}")
    assert_refused(*run_command(train.main, argv, capsys), canary)
    assert not (tmp_path / "new").exists()


def test_resume_refuses_a_planted_model_states_file(run, tmp_path, capsys):
    """Read at start-up, before the engine: the checkpoint's record of the run."""
    canary = tmp_path / "canary"
    plant(run / "out" / "global_step4" / MODEL_STATES, canary)
    assert_refused(*run_command(train.main, trainer(run, run / "out", "--init_from", "resume"), capsys), canary)


def test_nanogpt_import_refuses_a_planted_pickle(run, tmp_path, capsys):
    canary, ckpt = tmp_path / "canary", tmp_path / "ng" / "ckpt.pt"
    ckpt.parent.mkdir()
    model_args = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=512, bias=True, dropout=0.0)
    plant(ckpt, canary, {"model": {}, "model_args": model_args, "iter_num": 0})
    argv = trainer(run, tmp_path / "new", f"--init_from=nanogpt:{ckpt}")
    assert_refused(*run_command(train.main, argv, capsys), canary)


@pytest.mark.slow  # imports transformers
def test_hf_import_refuses_a_planted_pytorch_model_bin(run, tmp_path, capsys):
    pytest.importorskip("transformers")
    canary, hf = tmp_path / "canary", tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                "vocab_size": 512, "n_positions": 32, "n_embd": 64, "n_layer": 2,
                                                "n_head": 2}))
    plant(hf / "pytorch_model.bin", canary, {"transformer.wte.weight": torch.zeros(512, 64)})
    argv = trainer(run, tmp_path / "new", f"--init_from={hf}")
    code, lines = run_command(train.main, argv, capsys)
    assert_refused(code, lines, canary)
    assert str(hf.resolve()) in lines[0]


@pytest.mark.parametrize("content, reason", [(b"not a checkpoint", "Unsupported operand 110"),
                                             (b"", "not a file torch.save wrote")])
def test_a_file_that_is_no_pickle_is_one_line_naming_it(tmp_path, content, reason):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(UserError, match=f"x.pt cannot be read as a torch file \\({reason}\\)"):
        safe_load.load(tmp_path / "x.pt")


# --- the trainer's loads after the engine exists (forked ranks) ---------------------------------

def forked_resume(run: Path, tmp_path: Path, zero_stage: int = 1) -> list[str]:
    """Resume the copy in one forked rank; it must exit 2. Returns its error lines."""
    proc = forked_train(1, *trainer(run, run / "out", "--init_from", "resume", zero_stage=zero_stage),
                        log_dir=tmp_path / "logs", expect=2)
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    return [line for line in proc.stdout.splitlines() if "error:" in line]


@pytest.mark.parametrize("planted", [OPTIM_STATES, "rng_rank0.pt"])  # DeepSpeed's load_checkpoint; ours
def test_resume_on_the_same_layout_refuses_a_planted_pickle(run, tmp_path, planted):
    canary = tmp_path / "canary"
    plant(run / "out" / "global_step4" / planted, canary)
    lines = forked_resume(run, tmp_path)
    assert_refused(2, lines, canary)
    assert planted in lines[0]  # refused where it is read: DeepSpeed's load_checkpoint; the RNG restore


@pytest.mark.slow  # converts first
@pytest.mark.parametrize("planted", [OPTIM_STATES, f"{elastic.DIRNAME}/fp32.pt"])  # the shards; the converted form
def test_resume_on_another_layout_refuses_a_planted_pickle(run, tmp_path, planted):
    """ZeRO-1 -> ZeRO-2: converted to the layout-free form, which is then loaded."""
    canary, tag = tmp_path / "canary", run / "out" / "global_step4"
    elastic.convert(tag, json.loads((tag / MARKER).read_text()))  # published, recorded as made from this save
    plant(tag / planted, canary)
    lines = forked_resume(run, tmp_path, zero_stage=2)
    assert_refused(2, lines, canary)
    assert planted in lines[0]
