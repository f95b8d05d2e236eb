"""What the deepspeed launcher sends to other nodes arrives byte for byte: no remote shell interprets it.

    python -m ds_gpt.remote_shell env_file --out FILE     # the job's env file, values checked
    WORD=$(python -m ds_gpt.remote_shell pack -- ARG ...)  # the trainer's arguments as one word
    python -m ds_gpt.remote_shell launch --hostfile H --no_local_rank --module ds_gpt.remote_shell train "$WORD"

DeepSpeed's pdsh runner (deepspeed/launcher/multinode_runner.py) builds one line for every node,
which pdsh hands to ssh and so to a shell there:

    export NAME="value"; ... cd REPO; PYTHON -u -m deepspeed.launcher.launch ... SCRIPT ARG ...

It quotes only the arguments that hold a space, and puts the exported values in double quotes,
inside which `$(...)`, backticks, `$NAME` and backslashes still act; pdsh replaces %h, %n and %u
in the line. An out_dir or a run name with `$(...)` or `;` in it would run on every node, and the
launcher would return the status of whatever ran last, not the trainer's.

So the trainer's arguments travel as one base64url word of JSON (letters, digits, `-`, `_`, `=`:
nothing a shell or pdsh reads), which each rank decodes (`train WORD`). What cannot travel that
way (the exported environment, the repository path, the interpreter, the master address) is
checked before anything starts: `launch` is deepspeed's launcher (the same runner, in-process)
behind that check, and a value that the remote shell or pdsh would change is refused with one
line. slurm/ds_train.sh and the preflight's all-reduce launch through it.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
import sys
from typing import Mapping

from ds_gpt.errors import ArgumentParser, UserError, run_cli
from ds_gpt.preflight_checks import CACHE_VARS, COMM_PREFIXES

# What the ranks started over ssh get in the job's env file (their environment is otherwise bare):
# SLURM_JOB_ID lets a requeued job's rank 0 recognise its own run.lock (ds_gpt.run_lock).
ENV_FILE_VARS = ("PATH", "LD_LIBRARY_PATH", *CACHE_VARS, "HF_HOME", "HF_DATASETS_CACHE", "OMP_NUM_THREADS",
                 "SLURM_JOB_ID", "SLURM_JOB_NODELIST")
# The runner leaves a value matching this unquoted (its add_export), and double-quotes any other.
_BARE = re.compile(r"[\w@%+=:,./-]*")
_EXPANDED_IN_DOUBLE_QUOTES = re.compile(r'[$`"]|\\([$`"\\]|$)')
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# sshd runs the node's command line as one argument of `sh -c`, which Linux caps at 128 KiB.
MAX_WORD = 64 * 1024


def pack(argv: list[str]) -> str:
    """The arguments as one word that no shell, and not pdsh, changes.

    JSON keeps every character; a byte that is not UTF-8 (Python's surrogate escape) comes back as it was.
    """
    word = base64.urlsafe_b64encode(json.dumps(argv).encode("ascii")).decode("ascii")
    if len(word) > MAX_WORD:
        raise UserError(f"the trainer's arguments take {len(word)} bytes encoded; the command line that reaches "
                        f"the other nodes holds {MAX_WORD}", hint="move long options into a --config file")
    return word


def unpack(word: str) -> list[str]:
    try:
        argv = json.loads(base64.urlsafe_b64decode(word.encode("ascii")))
    except (UnicodeEncodeError, binascii.Error, ValueError):
        argv = None
    if not (isinstance(argv, list) and all(isinstance(arg, str) for arg in argv)):
        raise UserError(f"{word[:40]!r} is not a word made by `python -m ds_gpt.remote_shell pack`",
                        hint="launch as slurm/ds_train.sh does: --module ds_gpt.remote_shell train "
                             "\"$(python -m ds_gpt.remote_shell pack -- ARGS...)\"")
    return argv


# -----------------------------------------------------------------------------
# what cannot be packed: checked before anything starts


def word_problem(value: str) -> str | None:
    """Why `value`, put into the node's command line as it is (a path, a host), would not arrive intact."""
    if not value or not _BARE.fullmatch(value):
        return "holds characters the remote shell reads (only letters, digits and @+=:,./-_ arrive as they are)"
    return "holds %, which pdsh replaces (%h, %n, %u)" if "%" in value else None


def export_problem(name: str, value: str) -> str | None:
    """Why `export name=value`, as the runner writes it, would not give the ranks exactly `value`."""
    if not _NAME.fullmatch(name):
        return "is not a shell variable name"
    if "\n" in value or "\r" in value:
        return "holds a line break (the runner reads its env file line by line)"
    if value != value.strip():
        return "starts or ends with white space, which the runner strips"
    if "%" in value:
        return "holds %, which pdsh replaces (%h, %n, %u)"
    if not _BARE.fullmatch(value) and _EXPANDED_IN_DOUBLE_QUOTES.search(value):
        return "holds $, `, \" or an escaping \\, which the remote shell acts on inside the runner's double quotes"
    return None


def check_launch_line(exports: Mapping[str, str], words: Mapping[str, str]) -> None:
    """Refuse, in one line, any export or bare word that would not reach the nodes byte for byte."""
    problems = [f"{name} {why}" for name, value in exports.items() if (why := export_problem(name, value))]
    problems += [f"{what} {value!r} {why}" for what, value in words.items() if (why := word_problem(value))]
    if problems:
        raise UserError(f"the deepspeed launcher's command line for the other nodes would change what it carries: "
                        f"{'; '.join(problems)}", hint="set those variables to plain values (or unset them), keep "
                        "the repository and the venv on plain paths, and pass the trainer's arguments packed "
                        "(docs/slurm.md), or launch with DS_GPT_LAUNCH=srun")


def env_file_lines(environ: Mapping[str, str]) -> dict[str, str]:
    """What the job's env file carries: ENV_FILE_VARS that are set, and every NCCL_*/GLOO_*/TORCH_NCCL_* variable."""
    chosen = {k: environ[k] for k in ENV_FILE_VARS if environ.get(k)}
    chosen.update({k: v for k, v in sorted(environ.items()) if k.startswith(COMM_PREFIXES)})
    return chosen


def write_env_file(path: str, environ: Mapping[str, str]) -> None:
    """The job's env file, its values checked first, created owner-only: it may carry tokens."""
    lines = env_file_lines(environ)
    check_launch_line(lines, {})
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.writelines(f"{k}={v}\n" for k, v in lines.items())


def launch(argv: list[str]) -> int:
    """`deepspeed ARGV`, once everything its runner puts on the nodes' command line is known to arrive intact:
    what it exports (its env files, and the variables it passes on by itself), the repository path,
    the interpreter, the master address, the script and its arguments."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher import runner

    args = runner.parse_args(argv)
    hosts = runner.fetch_hostfile(args.hostfile) or {}
    if args.launcher.lower() != "pdsh" or args.no_ssh or not (args.force_multi or len(hosts) > 1):
        runner.main(argv)  # no pdsh line: one host starts its own ranks; other launchers build no such line
        return 0
    exports = {}
    for directory in runner.DEEPSPEED_ENVIRONMENT_PATHS:  # as runner.main reads them, the later winning
        env_file = os.path.join(directory, runner.DEEPSPEED_ENVIRONMENT_NAME)
        if os.path.isfile(env_file):
            with open(env_file) as fh:
                exports.update(line.rstrip("\n").split("=", 1) for line in fh if "=" in line)
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    excluded = {name for key, names in runner.EXCLUDE_ENVS.items() if key in environ for name in names}
    prefixes = tuple(runner.EXPORT_ENVS + get_accelerator().export_envs())
    exports.update({k: v for k, v in environ.items() if k.startswith(prefixes) and k not in excluded})
    words = {"repository path": os.getcwd(), "interpreter": sys.executable, "script": args.user_script,
             **{f"argument {i + 1}": arg for i, arg in enumerate(args.user_args)}}
    if args.master_addr:
        words["master address"] = args.master_addr
    check_launch_line(exports, words)
    runner.main(argv)  # exits with the nodes' status when it is not 0
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # the rest is deepspeed's own command line, for its parser
        return launch(argv[1:])
    parser = ArgumentParser(prog="ds_gpt.remote_shell", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env_file = sub.add_parser("env_file", help="write the job's env file (DS_ENV_FILE), its values checked")
    env_file.add_argument("--out", required=True, help="the file to create (it must not exist)")
    packer = sub.add_parser("pack", help="print the arguments after -- as one word for `train`")
    packer.add_argument("args", nargs="*")
    rank = sub.add_parser("train", help="(on each rank) run the trainer with the arguments of a word from `pack`")
    rank.add_argument("word")
    sub.add_parser("launch", help="deepspeed's launcher, once its command line for the nodes is checked: "
                   "launch DEEPSPEED_ARGS ...")
    args = parser.parse_args(argv)
    if args.command == "train":
        return train(args.word)
    if args.command == "env_file":
        write_env_file(args.out, os.environ)
    else:
        print(pack(args.args))
    return 0


def train(word: str) -> int:
    """A rank: the trainer, with the arguments `word` holds."""
    from ds_gpt.train import guarded_main

    argv = unpack(word)
    sys.argv = ["ds_gpt/train.py", *argv]  # what config.json records: the arguments as given
    return guarded_main(argv)


if __name__ == "__main__":
    rank = sys.argv[1:2] == ["train"]  # a rank speaks as the trainer: its error lines, its teardown
    run_cli(main, prog="ds_gpt.train" if rank else "ds_gpt.remote_shell", skip_teardown=rank)
