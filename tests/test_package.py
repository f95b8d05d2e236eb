"""The package as a whole: installed for use from any directory, and how its modules import one another."""
from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, REPO_ROOT

PACKAGE = REPO_ROOT / "ds_gpt"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each ds_gpt module -> the ds_gpt modules it imports anywhere in its file (lazy imports too)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ds_gpt"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("ds_gpt.")}
        graph[name] = {d for d in deps if d in files and d not in (name, "ds_gpt")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that starts and ends at the same module, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for dep in sorted(graph[node]):
            if cycle := visit(dep, path + [node]):
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := visit(start, []):
            return cycle
    return None


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_point_down():
    """No module imports one that (perhaps lazily, through others) imports it back."""
    graph = import_graph()
    assert {"ds_gpt.checkpoint", "ds_gpt.elastic", "ds_gpt.engine", "ds_gpt.collectives"} <= graph.keys()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


USER_SCRIPT = """
import json, torch
from ds_gpt.export import load_export
model = load_export("fp32")
with torch.no_grad():
    logits, _ = model(torch.tensor([[1, 2, 3]]), targets=torch.tensor([[1, 2, 3]]))
print(json.dumps(logits.flatten().tolist()))
"""


@pytest.mark.slow  # two interpreters start (one imports torch): 4-20 s on 2 cores, with the load
def test_commands_and_the_export_loader_work_from_another_directory(tmp_path):
    """What `make setup`'s editable install gives: `python -m ds_gpt.<command>` from anywhere, and
    a script of the user's that loads an export in one call, with no PYTHONPATH."""
    from ds_gpt.export import export
    from ds_gpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8)).eval()
    export(model.state_dict(), {"model_args": model.config.to_dict(), "iter_num": 1}, "fp32", tmp_path / "fp32")
    (tmp_path / "user.py").write_text(USER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> str:
        proc = subprocess.run([PYTHON, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{proc.stderr[-2000:]}\n(is ds_gpt installed? `make setup` installs it)"
        return proc.stdout

    assert run("-m", "ds_gpt.hostfile", "--nodelist", "n[1-2]", "--slots", "4").split() == \
        ["n1", "slots=4", "n2", "slots=4"]
    with torch.no_grad():
        expected, _ = model(torch.tensor([[1, 2, 3]]), targets=torch.tensor([[1, 2, 3]]))
    # the last line: importing DeepSpeed may log its accelerator choice to stdout first
    assert json.loads(run("user.py").strip().splitlines()[-1]) == expected.flatten().tolist()
