"""Write a DeepSpeed hostfile for the current SLURM allocation, and read one back.

    python -m ds_gpt.hostfile                          # print `host slots=N` lines
    python -m ds_gpt.hostfile --out hostfiles/$SLURM_JOB_ID
    python -m ds_gpt.hostfile --nodelist 'ng[10101-10102]' --slots 4
    python -m ds_gpt.hostfile --check hostfiles/narval     # before `deepspeed --hostfile`

Nodes come from SLURM_JOB_NODELIST (or --nodelist), expanded by `scontrol show hostnames`
where scontrol exists and by `expand_nodelist` (the same bracket syntax, pure Python) where
it does not. Slots per node come from the first of:
  --slots N                 the same on every node
  SLURM_GPUS_ON_NODE        GPUs on every node (0, a CPU job, falls through)
  SLURM_GPUS_PER_NODE       `4`, `a100:4`, `gpu:a100:4` (0, from --gpus-per-node=0, falls through)
  SLURM_TASKS_PER_NODE      tasks per node in SLURM's compressed form, `4(x2),2`: node by node,
                            so an uneven allocation gets the right slots on each node
  SLURM_NTASKS_PER_NODE     the same on every node

No torch or deepspeed here: this runs on a login node and in the batch script.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from ds_gpt import atomic
from ds_gpt.errors import ArgumentParser, UserError, os_error, run_cli

# -----------------------------------------------------------------------------
# SLURM node lists: "ng[10101-10102,10205],cdr7" -> ng10101 ng10102 ng10205 cdr7

_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets ("a[1,2],b" -> ["a[1,2]", "b"])."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise UserError(f"node list {text!r}: nested brackets are not allowed")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"node list {text!r}: ']' without a matching '['")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise UserError(f"node list {text!r}: '[' without a matching ']'")
    parts.append(text[start:])
    return parts


def _expand_range(spec: str, whole: str) -> list[str]:
    """"01-03,7" -> ["01", "02", "03", "7"]; the width of the lower bound is kept (zero padding)."""
    out = []
    for item in spec.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise UserError(f"node list {whole!r}: bad range {item!r} (expected N or N-M with digits)")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise UserError(f"node list {whole!r}: range {item!r} runs backwards")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compact host list syntax, the way `scontrol show hostnames` does.

    Several bracket groups in one name multiply out (`r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2).
    """
    text = nodelist.strip()
    if not text:
        raise UserError("empty node list", hint="run inside an allocation (sbatch/salloc) or pass --nodelist")
    hosts: list[str] = []
    for part in _split_top_level(text):
        part = part.strip()
        if not part:
            raise UserError(f"node list {nodelist!r}: empty host name between commas")
        names = [""]
        pos = 0
        for m in _BRACKET.finditer(part):
            prefix = part[pos:m.start()]
            names = [n + prefix + x for n in names for x in _expand_range(m.group(1), nodelist)]
            pos = m.end()
        names = [n + part[pos:] for n in names]
        for name in names:
            if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
                raise UserError(f"node list {nodelist!r}: {name!r} is not a host name")
        hosts.extend(names)
    return hosts


def scontrol_hostnames(nodelist: str) -> list[str] | None:
    """`scontrol show hostnames` where scontrol exists (it knows every site's quirks), else None."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    proc = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"scontrol show hostnames {nodelist!r} failed: {proc.stderr.strip()}")
    hosts = proc.stdout.split()
    if not hosts:
        raise UserError(f"scontrol show hostnames {nodelist!r} returned no hosts")
    return hosts


# -----------------------------------------------------------------------------
# slots per node


def _count(value: str, name: str, minimum: int = 1) -> int:
    if not value.strip().isdigit() or int(value) < minimum:
        raise UserError(f"{name}={value!r}: expected an integer >= {minimum}")
    return int(value)


def gpus_from_gres(value: str) -> int:
    """SLURM_GPUS_PER_NODE forms: "4", "a100:4", "gpu:a100:4", "a100:2,v100:2" (summed); "0" for none."""
    return sum(_count(item.strip().rsplit(":", 1)[-1], "SLURM_GPUS_PER_NODE", minimum=0) for item in value.split(","))


_TASKS = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def tasks_per_node(value: str) -> list[int]:
    """SLURM_TASKS_PER_NODE, node by node: "4(x2),2" -> [4, 4, 2]."""
    counts: list[int] = []
    for item in value.split(","):
        m = _TASKS.match(item.strip())
        if m is None or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
            raise UserError(f"SLURM_TASKS_PER_NODE={value!r}: {item!r} is not N or N(xM)")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slots_per_node(slots: int | None, environ: Mapping[str, str], n_hosts: int) -> list[int]:
    """Slots of each of the `n_hosts` nodes, from --slots or the allocation (see the module doc)."""
    if slots is not None:
        if slots < 1:
            raise UserError(f"--slots {slots}: expected a positive integer")
        return [slots] * n_hosts
    gpus = 0
    if environ.get("SLURM_GPUS_ON_NODE"):
        gpus = _count(environ["SLURM_GPUS_ON_NODE"], "SLURM_GPUS_ON_NODE", minimum=0)
    if not gpus and environ.get("SLURM_GPUS_PER_NODE"):
        gpus = gpus_from_gres(environ["SLURM_GPUS_PER_NODE"])
    if gpus:
        return [gpus] * n_hosts
    if environ.get("SLURM_TASKS_PER_NODE"):
        counts = tasks_per_node(environ["SLURM_TASKS_PER_NODE"])
        if len(counts) != n_hosts:
            raise UserError(f"SLURM_TASKS_PER_NODE={environ['SLURM_TASKS_PER_NODE']!r} describes {len(counts)} "
                            f"node(s) but the node list has {n_hosts}", hint="pass --slots N")
        return counts
    if environ.get("SLURM_NTASKS_PER_NODE"):
        return [_count(environ["SLURM_NTASKS_PER_NODE"], "SLURM_NTASKS_PER_NODE")] * n_hosts
    raise UserError("cannot tell how many slots each node has",
                    hint="pass --slots N, or request --gpus-per-node / --ntasks-per-node")


# -----------------------------------------------------------------------------
# hostfile text


def format_hostfile(hosts: list[str], slots: list[int]) -> str:
    return "".join(f"{host} slots={n}\n" for host, n in zip(hosts, slots, strict=True))


_LINE = re.compile(r"^(?P<host>[A-Za-z0-9._-]+)\s+slots=(?P<slots>\d+)$")


def read_hostfile(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Parse and check a DeepSpeed hostfile; a bad line is a UserError naming its line number.

    DeepSpeed's own parser stops with a traceback and no line number, accepts `slots=0`, and
    ignores anything after `slots=N`. Blank lines and `#` comments are allowed.
    """
    path = Path(path)
    try:
        text = atomic.read_text(path, "hostfile")
    except OSError as err:
        raise os_error(err, doing=f"cannot read hostfile {path}") from None
    entries: list[tuple[str, int]] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None:
            raise UserError(f"{path}:{lineno}: bad hostfile line {raw.strip()!r}",
                            hint="each line is `hostname slots=N`")
        host, slots = m.group("host"), int(m.group("slots"))
        if slots < 1:
            raise UserError(f"{path}:{lineno}: {host} has slots=0; give each host at least one slot")
        if host in seen:
            raise UserError(f"{path}:{lineno}: host {host} is listed twice")
        seen.add(host)
        entries.append((host, slots))
    if not entries:
        raise UserError(f"hostfile {path} lists no hosts", hint="python -m ds_gpt.hostfile --out " + str(path))
    return entries


# -----------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    parser = ArgumentParser(prog="python -m ds_gpt.hostfile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the hostfile here (default: print it)")
    parser.add_argument("--slots", type=int, help="slots (GPUs / ranks) per node")
    parser.add_argument("--nodelist", help="SLURM node list (default: $SLURM_JOB_NODELIST)")
    parser.add_argument("--check", metavar="HOSTFILE",
                        help="check a hostfile and exit: the deepspeed launcher's own parser stops with a traceback")
    args = parser.parse_args(argv)
    if args.check:
        entries = read_hostfile(args.check)
        print(f"{args.check}: {len(entries)} host(s), {sum(n for _, n in entries)} slot(s)", file=sys.stderr)
        return 0

    nodelist = args.nodelist or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if nodelist is None:
        raise UserError("not inside a SLURM allocation (SLURM_JOB_NODELIST is unset)",
                        hint=f"pass --nodelist, or write `{socket.gethostname()} slots=N` by hand")
    expand_nodelist(nodelist)  # our own checks first, so a malformed list gets the same message everywhere
    hosts = scontrol_hostnames(nodelist) or expand_nodelist(nodelist)
    text = format_hostfile(hosts, slots_per_node(args.slots, environ, len(hosts)))
    if args.out:
        atomic.write_text(args.out, text)  # a running launcher never reads half a file
        print(f"wrote {args.out}: {len(hosts)} host(s)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    run_cli(main, prog="ds_gpt.hostfile")
