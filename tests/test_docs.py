"""Every command block in README.md and docs/ runs as written, in the order a reader meets it.

A reader of the README on a fresh clone types the ```bash blocks top to bottom, then follows its
links into docs/. This test does the same in a clean copy of the repository (tracked files only,
the set-up's .venv and .cache beside them, no out/, data/ or export/), one block after another,
each as one bash script (`set -eo pipefail`): a block that fails names its page and line.

What is not run, and why, is written in the docs themselves, as a comment on the line or on the
first line of a block, using one of the phrases of NOT_HERE (e.g. `# on a cluster: ...`); a
command that needs SLURM, a GPU or the internet and is not marked fails here, so the marks stay
true. Two changes are made to what runs, both for time: every training command trains TRAIN_CAP
iterations (appended flags win over earlier ones and over the TOML), and `make demo` gets the same
through the Makefile's DEMO_ARGS. `make test` and `make test-fast` are this suite and are not run
from within it. A command a page repeats word for word from an earlier block (the README's train
command in docs/training.md, say) already ran there, in this same copy, and is not run again.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO_ROOT, VENV_BIN, free_port

# The phrases that mark a command (or, on a block's first line, the whole block) as one that
# cannot run on this 2-core CPU machine without the internet. Each says why.
NOT_HERE = {
    "on a cluster": "needs a SLURM allocation or the cluster's nodes",
    "on a gpu": "needs a CUDA device",
    "needs the internet": "downloads from the Hugging Face Hub or wandb.ai",
    "run by hand": "a benchmark that measures for minutes; tests/test_bench.py runs each on a tiny setting",
    "nanogpt's own run": "needs a ckpt.pt written by nanoGPT's train.py; tests/test_interop.py builds one",
}
# What each training command runs instead of its own schedule: enough to start, step, evaluate,
# checkpoint and end, so that the commands after it (sample, export, report) have a run to read.
TRAIN_CAP = "--max_iters 4 --eval_interval 2 --eval_iters 1 --checkpoint_interval 4"
# DeepSpeed's JIT ops are rebuilt when the include paths in their compile command change, and those
# hold the venv's path: the copy's commands name the set-up's venv by its real path, so they load
# the builds the suite already has instead of recompiling them into the shared cache.
VENV = VENV_BIN.parent
TRAINER = re.compile(r"(ds_gpt/train\.py|-m ds_gpt\.train)\b")
HEREDOC = re.compile(r"<<-?'?(\w+)'?")  # a heredoc's start; group 1 is the word that ends it
# The commands whose second run, word for word in the same copy, repeats the first one's outcome
# (set-up, ds_gpt's commands, the trainer with init_from auto): only these are not run twice.
IDEMPOTENT = re.compile(r"(make setup|(\.venv/bin/)?python -m ds_gpt\.|deepspeed )")


@dataclass
class Block:
    page: str
    line: int
    script: str
    skipped: list[str]


def reading_order() -> list[Path]:
    """README.md, then the docs pages in the order the README first links them, then the rest."""
    readme = REPO_ROOT / "README.md"
    linked = dict.fromkeys(re.findall(r"\(docs/([\w-]+\.md)", readme.read_text()))
    pages = [REPO_ROOT / "docs" / name for name in linked]
    rest = sorted(p for p in (REPO_ROOT / "docs").glob("*.md") if p not in pages)
    return [readme, *pages, *rest]


def not_here(comment: str) -> str | None:
    lowered = comment.lower()
    return next((phrase for phrase in NOT_HERE if phrase in lowered), None)


def command_lines(body: list[str]) -> list[str]:
    """The block's commands: backslash continuations joined, and a heredoc's body kept verbatim
    with the command that opens it (after a newline), so that it runs, or is left out, with it."""
    lines: list[str] = []
    heredoc_end = None
    for raw in body:
        if heredoc_end is not None:
            lines[-1] += "\n" + raw
            heredoc_end = None if raw.strip() == heredoc_end else heredoc_end
            continue
        if lines and lines[-1].endswith("\\") and not lines[-1].startswith("#"):
            lines[-1] = lines[-1][:-1].rstrip() + " " + raw.strip()
        else:
            lines.append(raw)
        match = HEREDOC.search(lines[-1])
        heredoc_end = match.group(1) if match else None
    return lines


def as_run_here(line: str) -> str:
    """The line as this test runs it: training commands capped (see TRAIN_CAP)."""
    code, _, comment = line.partition(" #")
    if line.lstrip().startswith("make "):  # the set-up's venv by its own path (see fresh_clone)
        code = f"{code.rstrip()} VENV={VENV}"
    if line.lstrip().startswith("make demo"):
        return f"{code} DEMO_ARGS='{TRAIN_CAP}'"
    if TRAINER.search(code) and "--help" not in code:
        port = f" --master_port {free_port()}" if code.lstrip().startswith("deepspeed") else ""
        code = code.replace("deepspeed ", f"deepspeed{port} ", 1) + " " + TRAIN_CAP
    return code.rstrip()


def blocks() -> list[Block]:
    return parse([(str(page.relative_to(REPO_ROOT)), page.read_text()) for page in reading_order()])


def parse(pages: list[tuple[str, str]]) -> list[Block]:
    """The ```bash blocks of (name, text) pages, in the order given, as this test runs them."""
    found = []
    first_run: dict[str, str] = {}  # a command, its whitespace collapsed -> the block that ran it
    for name, page_text in pages:
        text = page_text.splitlines()
        i = 0
        while i < len(text):
            if text[i].strip() != "```bash":
                i += 1
                continue
            start, i = i + 1, i + 1
            body = []
            while text[i].strip() != "```":
                body.append(text[i])
                i += 1
            lines = command_lines(body)
            block_mark = not_here(lines[0]) if lines and lines[0].lstrip().startswith("#") else None
            script, skipped = [], []
            for line in lines:
                head, newline, heredoc = line.partition("\n")
                mark = block_mark or not_here(head.partition("#")[2])
                if head.lstrip().startswith("#") or not head.strip():
                    continue
                command = " ".join(head.partition(" #")[0].split())
                if head.lstrip().startswith("make test"):
                    skipped.append(f"{head.strip()}  [the suite itself]")
                elif mark:
                    skipped.append(f"{head.strip()}  [{NOT_HERE[mark]}]")
                elif command in first_run and IDEMPOTENT.match(command):
                    skipped.append(f"{head.strip()}  [ran at {first_run[command]}]")
                else:
                    first_run.setdefault(command, f"{name}:{start}")
                    script.append(as_run_here(head) + newline + heredoc)
            found.append(Block(name, start, "\n".join(script), skipped))
    return found


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory, shakespeare_data) -> Path:
    """The tracked files in a new directory, with the set-up's venv and caches beside them."""
    # The pages' `make` commands name the set-up's venv. Were its stamps older than the pins, they
    # would reinstall into it, ds_gpt included, from this copy: the other test worker's commands
    # would then find no ds_gpt mid-install, and the venv would point at a directory soon removed.
    extras = [p.stem.removeprefix("requirements-") for p in REPO_ROOT.glob("requirements-*.txt")]
    stamps = [f"{VENV}/.installed-{part}" for part in ("ds_gpt", *extras)]
    if subprocess.run(["make", "-q", f"VENV={VENV}", *stamps], cwd=REPO_ROOT, capture_output=True).returncode:
        pytest.fail(f"{VENV} is older than requirements*.txt or pyproject.toml: run `make setup` "
                    "(make test does), then the suite")
    work = tmp_path_factory.mktemp("reader") / "ds_gpt"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True,
                             text=True).stdout.split("\0")
    for name in filter(None, tracked):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, work / name)  # mtimes kept: make sees the venv up to date
    for kept in (".venv", ".cache"):  # .venv for the docs' own `.venv/bin/python` lines
        (work / kept).symlink_to(REPO_ROOT / kept)
    return work


PAGES = list(dict.fromkeys(b.page for b in blocks() if b.script))  # the pages with a block to run, in order


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("page", PAGES)
def test_every_command_block_runs_in_reading_order(fresh_clone: Path, page: str) -> None:
    """One page's blocks, in order; the pages run in reading order in one shared copy, each after
    the ones before it (a page's commands may use what an earlier page made, as a reader's do)."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "WANDB_MODE": "offline"}
    env.pop("PYTHONPATH", None)
    for block in (b for b in blocks() if b.page == page and b.script):
        proc = subprocess.run(["bash", "-eo", "pipefail", "-c", block.script], cwd=fresh_clone, env=env,
                              capture_output=True, text=True, timeout=600)
        where = f"{block.page}:{block.line}"
        assert proc.returncode == 0, f"{where} exited {proc.returncode}:\n{block.script}\n" \
                                     f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stdout + proc.stderr, f"{where} printed a traceback:\n{proc.stderr[-3000:]}"


def test_the_docs_have_blocks_that_run() -> None:
    runnable = [b for b in blocks() if b.script]
    assert len(runnable) >= 10 and {b.page for b in runnable} >= {"README.md", "docs/training.md"}, \
        "the reading order or the parser lost the docs"


def test_the_parser_joins_continuations_keeps_heredocs_and_honours_marks(tmp_path: Path) -> None:
    lines = command_lines(["python -m ds_gpt.plan --model 124M \\", "    --gpus 8   # on a cluster: 8 GPUs",
                           "python - <<'EOF'", "x = 1 \\", "EOF", "echo done"])
    assert lines == ["python -m ds_gpt.plan --model 124M --gpus 8   # on a cluster: 8 GPUs",
                     "python - <<'EOF'\nx = 1 \\\nEOF", "echo done"]
    assert not_here(lines[0].partition("#")[2]) == "on a cluster"
    assert not_here("# writes out/x") is None
    capped = as_run_here("deepspeed --num_gpus 2 ds_gpt/train.py --max_iters 100  # two ranks")
    assert capped.startswith("deepspeed --master_port ") and capped.endswith(TRAIN_CAP)
    assert as_run_here("python -m ds_gpt.train --help") == "python -m ds_gpt.train --help"
    assert as_run_here("python -m ds_gpt.sample --out_dir out/demo") == "python -m ds_gpt.sample --out_dir out/demo"


def test_a_command_already_run_word_for_word_is_not_run_again() -> None:
    first = "```bash\nmake setup\npython -m ds_gpt.sample --out_dir out/demo\necho hi\n```\n"
    second = ("```bash\nmake   setup   # once\npython -m ds_gpt.sample --out_dir out/demo\n"
              "python -m ds_gpt.sample --out_dir out/other\necho hi\ncat <<'EOF'\nmake setup\nEOF\n```\n")
    one, two = parse([("README.md", first), ("docs/x.md", second)])
    assert one.script == "make setup VENV=%s\npython -m ds_gpt.sample --out_dir out/demo\necho hi" % VENV
    assert two.script == "python -m ds_gpt.sample --out_dir out/other\necho hi\ncat <<'EOF'\nmake setup\nEOF"
    assert two.skipped == ["make   setup   # once  [ran at README.md:1]",
                           "python -m ds_gpt.sample --out_dir out/demo  [ran at README.md:1]"]
