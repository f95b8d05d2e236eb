"""The preflight's judgements: facts in (allocation, env file, probe and rank reports), results out.

Pure functions of text and dicts, apart from reading the allocation (`scontrol`) and the env
file; ds_gpt.preflight gathers the facts and prints the results.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from ds_gpt.errors import UserError
from ds_gpt.hostfile import expand_nodelist, gpus_from_gres, scontrol_hostnames, tasks_per_node
from ds_gpt.paths import REPO_ROOT
from ds_gpt.plan_comm import Links

NO_REPO, NO_PYTHON = 97, 98  # the probe's shell exits with these when `cd` / the interpreter fail
SSH_FAILED = 255
# What the ranks started over ssh must see as the launching shell does (when it sets them).
CACHE_VARS = ("DS_GPT_CACHE", "TORCH_EXTENSIONS_DIR", "TIKTOKEN_CACHE_DIR")
COMM_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_")
VENV_BIN = str(Path(sys.executable).parent)


@dataclass
class Result:
    check: str  # hostfile | allocation | env | ssh | srun | repo | python | master | port | data | out_dir | allreduce
    ok: bool
    message: str
    hint: str | None = None
    hosts: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def line(self) -> str:
        where = f"{','.join(self.hosts)}: " if self.hosts else ""
        return f"{self.check}: {where}{self.message}" + (f" (HINT: {self.hint})" if self.hint else "")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("details"), line=self.line)
        return d


def human(n: float) -> str:
    """Bytes for people: 48.0 kB, 2.2 MB, 17.4 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def merge(results: list[Result]) -> list[Result]:
    """One line per distinct problem, naming every host that has it."""
    merged: dict[tuple, Result] = {}
    for r in results:
        key = (r.check, r.ok, r.message, r.hint)
        if key in merged:
            merged[key].hosts += [h for h in r.hosts if h not in merged[key].hosts]
        else:
            merged[key] = Result(r.check, r.ok, r.message, r.hint, list(r.hosts), dict(r.details))
    return list(merged.values())


# -----------------------------------------------------------------------------
# the allocation and the hostfile


@dataclass
class Allocation:
    nodelist: str
    nodes: list[str]
    tasks: dict[str, int]  # SLURM tasks per node
    gpus: dict[str, int]  # GPUs SLURM gave each node (0 for a CPU job)
    gpu_type: str | None = None  # "a100" from gpu:a100:4, when the job names one


GPU_GRES = r"gpu(?::[^:(,]+)?:(\d+)"  # gpu:4 or gpu:a100:4, as scontrol shows a node's GRES


def gpu_type(text: str) -> str | None:
    """"a100" from `gpu:a100:4(IDX:0-3)` (scontrol) or `a100:4` (SLURM_GPUS_PER_NODE); None if untyped."""
    m = re.search(r"(?:^|gpu:|,)([A-Za-z][\w.-]*):\d+", text)
    return m.group(1).lower() if m and m.group(1) != "gpu" else None


def gpus_from_job(text: str) -> dict[str, int]:
    """Per-node GPU counts from `scontrol show job -d` (`Nodes=n[1-2] CPU_IDs=.. GRES=gpu:a100:4(IDX:0-3)`)."""
    gpus: dict[str, int] = {}
    for nodes, gres in re.findall(r"^\s*Nodes=(\S+) .*?GRES=(\S*)", text, flags=re.M):
        count = sum(int(n) for n in re.findall(GPU_GRES, gres))
        for node in expand_nodelist(nodes):
            gpus[node] = gpus.get(node, 0) + count
    return gpus


def read_allocation(environ: Mapping[str, str]) -> Allocation | None:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    nodes = scontrol_hostnames(nodelist) or expand_nodelist(nodelist)
    if environ.get("SLURM_TASKS_PER_NODE"):
        tasks = tasks_per_node(environ["SLURM_TASKS_PER_NODE"])
        if len(tasks) != len(nodes):
            raise UserError(f"SLURM_TASKS_PER_NODE={environ['SLURM_TASKS_PER_NODE']!r} describes {len(tasks)} "
                            f"node(s), SLURM_JOB_NODELIST {len(nodes)}")
    else:
        tasks = [int(environ.get("SLURM_NTASKS_PER_NODE") or 1)] * len(nodes)
    job = environ.get("SLURM_JOB_ID")
    gpus: dict[str, int] = {}
    shown = ""
    if job and shutil.which("scontrol"):
        proc = subprocess.run(["scontrol", "show", "job", "-d", job], capture_output=True, text=True)
        shown = proc.stdout if proc.returncode == 0 else ""
        gpus = gpus_from_job(shown)
    if not gpus:  # no scontrol: every node alike, as the job asked
        uniform = (int(environ.get("SLURM_GPUS_ON_NODE") or 0)
                   or gpus_from_gres(environ.get("SLURM_GPUS_PER_NODE") or "0"))
        gpus = {n: uniform for n in nodes}
    kind = gpu_type(" ".join(re.findall(r"GRES=(\S+)", shown))) or gpu_type(environ.get("SLURM_GPUS_PER_NODE", ""))
    return Allocation(nodelist, nodes, dict(zip(nodes, tasks, strict=True)), {n: gpus.get(n, 0) for n in nodes}, kind)


def allocation_results(entries: list[tuple[str, int]], alloc: Allocation | None, launcher: str) -> list[Result]:
    """The hostfile's hosts and slots (deepspeed), or the tasks per node (srun), against the allocation."""
    name = "allocation" if launcher == "srun" else "hostfile"
    if alloc is None:
        return [Result(name, True, "no allocation to compare with (not inside salloc/sbatch)")]
    regen = "regenerate it inside the job with python -m ds_gpt.hostfile --out FILE, as slurm/ds_train.sh does"
    out = []
    for host, slots in entries:
        if host not in alloc.nodes:
            out.append(Result(name, False, f"not in this job's allocation ({alloc.nodelist})", regen, [host]))
            continue
        gpus, tasks = alloc.gpus[host], alloc.tasks[host]
        if launcher == "srun" and gpus and tasks != gpus:
            out.append(Result(name, False, f"{tasks} task(s) for {gpus} GPU(s): srun starts one rank per task",
                              "request --ntasks-per-node equal to --gpus-per-node", [host]))
        elif launcher != "srun" and slots != (gpus or tasks):
            what = f"{gpus} GPU(s)" if gpus else f"{tasks} task(s) and no GPU"
            out.append(Result(name, False, f"slots={slots} but SLURM gave it {what}", regen, [host]))
    missing = [n for n in alloc.nodes if n not in dict(entries)]
    if missing:
        out.append(Result(name, False, "in the allocation but not in the hostfile: its GPUs would sit idle",
                          regen, missing))
    return merge(out) or [Result(name, True, f"{len(entries)} host(s) agree with the allocation {alloc.nodelist}")]


# -----------------------------------------------------------------------------
# the environment the ranks get


def wanted_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Variables the ranks must see as here: PATH (with the venv), the caches, NCCL_*/GLOO_* settings."""
    wanted = {"PATH": environ.get("PATH", "")}
    wanted.update({k: environ[k] for k in CACHE_VARS if environ.get(k)})
    wanted.update({k: v for k, v in sorted(environ.items()) if k.startswith(COMM_PREFIXES)})
    return wanted


def env_mismatch(name: str, wanted: str, got: str | None) -> str | None:
    """Why `got` (the ranks' value) will not do, or None. PATH needs only the venv's bin."""
    if name == "PATH":
        return None if got and VENV_BIN in got.split(os.pathsep) else f"PATH lacks the venv's {VENV_BIN}"
    if got is None:
        return f"{name} is left out (here {name}={wanted})"
    return None if got.strip() == wanted.strip() else f"{name}={got.strip()} but here {name}={wanted}"


def env_file_results(environ: Mapping[str, str], wanted: dict[str, str]) -> tuple[list[Result], dict]:
    """The file the deepspeed launcher exports to ranks over ssh: DS_ENV_FILE or .deepspeed_env in ~ and ."""
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    # deepspeed.launcher.runner reads os.path.join(dir, name) for dir in (~, .); an absolute name is read twice.
    paths = list(dict.fromkeys(Path(os.path.join(d, name)) for d in (os.path.expanduser("~"), os.getcwd())))
    found = [p for p in paths if p.is_file()]
    if not found:
        return [Result("env", False, f"no {name} in ~ or {os.getcwd()}: ranks started over ssh get a bare "
                       "environment", "slurm/ds_train.sh writes one per job and sets DS_ENV_FILE; by hand: "
                       "printf 'PATH=%s\\n' \"$PATH\" > ~/.deepspeed_env")], {}
    exported: dict[str, str] = {}
    for path in found:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            key, sep, value = line.partition("=")
            if not sep:
                return [Result("env", False, f"{path}:{lineno}: {line!r} is not NAME=value (the deepspeed "
                               "launcher stops on it)", f"fix or remove line {lineno}")], {}
            exported[key.strip()] = value.strip()
    details = {"path": str(found[-1]), "mode": f"{found[-1].stat().st_mode & 0o777:04o}"}
    problems = {k: p for k, p in ((k, env_mismatch(k, v, exported.get(k))) for k, v in wanted.items()) if p}
    if problems:
        return [Result("env", False, f"{found[-1]}: {'; '.join(problems.values())}",
                       "export them before the job starts (slurm/ds_train.sh copies them into its env file), "
                       "or add NAME=value lines to the file", details={**details, "problems": problems})], details
    return [Result("env", True, f"{found[-1]} carries {', '.join(wanted)}", details=details)], details


# -----------------------------------------------------------------------------
# the hosts' probe reports


def judge_probes(probes: dict[str, dict], master: str, port: int, token: str | None, need: int, model: dict,
                 keep_last: int, here: dict, transport: str) -> list[Result]:
    hosts = list(probes)
    out: list[Result] = []
    transport_check = "srun" if transport == "srun" else "ssh"
    for host, r in probes.items():
        def bad(check, message, hint=None, host=host):
            out.append(Result(check, False, message, hint, [host]))
        if "failed" in r:
            code = r["failed"]
            if code == NO_REPO:
                bad("repo", f"no repository at {REPO_ROOT}",
                    "the repository and its venv must be at the same path on every node (a shared filesystem)")
            elif code == NO_PYTHON:
                bad("python", f"no interpreter at {sys.executable}",
                    "the venv must be at the same path on every node (a shared filesystem)")
            elif transport_check == "ssh":
                bad("ssh", f"unreachable without a password: {r['stderr']}", "passwordless ssh between the job's "
                    "nodes (ssh-keygen, authorized_keys, known_hosts), or launch with DS_GPT_LAUNCH=srun")
            else:
                bad("srun", f"the probe step gave no answer: {r['stderr']}", "check `sinfo -N` and the node's slurmd")
            continue
        for package in ("python", "torch", "deepspeed"):
            if r["versions"].get(package) != here.get(package):
                bad("python", f"{package} {r['versions'].get(package)} there, {here.get(package)} here",
                    "one venv for every node: the same path, the same packages")
        if "error" in r["master"]:
            bad("master", f"cannot resolve the master address {master} ({r['master']['error']})",
                "MASTER_ADDR must be a name every node resolves (the first host of the hostfile by default)")
        if host == hosts[0] and not r.get("port", {}).get("free", True):
            bad("port", f"master port {port} is taken ({r['port'].get('error')})",
                "another job or a stale rank holds it: pass --master_port / MASTER_PORT=N with a free one")
        data = r.get("data", {})
        if not data.get("ok", True):
            bad("data", data["error"], data.get("hint"))
        od = r.get("out_dir", {})
        if not od.get("writable", True):
            bad("out_dir", f"not writable: {od.get('error')}", "pass an --out_dir every node can write")
        elif token and od.get("token") != token:
            bad("out_dir", "does not see the file the preflight wrote there: not one filesystem for all nodes",
                "checkpoints need a shared filesystem: put OUT_DIR on project or scratch space")
        elif od.get("free_bytes") is not None and od["free_bytes"] < need:
            out.append(Result("out_dir", False, f"{human(od['free_bytes'])} free, {keep_last + 1} checkpoints "
                              f"(keep_last {keep_last} + 1) of {human(model['checkpoint_bytes'])} need {human(need)}",
                              "free space, lower --keep_last, or use a larger filesystem", [host],
                              {"free_bytes": od["free_bytes"], "need_bytes": need}))
    out = merge(out)
    failed = {r.check for r in out}
    answered = [h for h in hosts if "failed" not in probes[h]]
    free = min((probes[h].get("out_dir", {}).get("free_bytes") or 0 for h in answered), default=0)
    for check, message, details in (
            (transport_check, f"{len(answered)} host(s) answered", {}),
            ("python", f"{here.get('python')}, torch {here.get('torch')}, deepspeed {here.get('deepspeed')} "
             "on every host", {}),
            ("master", f"{master} resolves on every host; port {port} is free", {}),
            ("data", "readable on every host, as meta.json says", {}),
            ("out_dir", f"shared and writable, {human(free)} free >= {human(need)}",
             {"free_bytes": free, "need_bytes": need})):
        if check not in failed and not (check == "master" and "port" in failed):
            out.append(Result(check, True, message, details=details))
    return out


def judge_allreduce(reports: list[dict], tail: str, world: int, hosts: list[str], wanted: dict[str, str],
                    gpu: str, links: Links) -> tuple[list[Result], dict]:
    """The ranks' environment, the all-reduce's sum, and its bus bandwidth beside the planner's link."""
    if len(reports) < world:
        return [Result("allreduce", False, f"{len(reports)} of {world} ranks reported: {tail}",
                       "the ranks must reach the master address and port; see the launcher's output")], {}
    out = []
    for r in reports:
        host = r.get("node") or (hosts[r["node_rank"]] if r["node_rank"] < len(hosts) else r["hostname"])
        for name, value in wanted.items():
            problem = env_mismatch(name, value, r["env"].get(name))
            if problem:
                out.append(Result("env", False, f"ranks see {problem}", "the launcher does not pass it on: add it "
                                  "to DS_ENV_FILE (deepspeed) or export it before srun", [host]))
        if not r["correct"]:
            out.append(Result("allreduce", False, f"rank {r['rank']} got a wrong sum", "a broken link or driver",
                              [host]))
    rank0 = min(reports, key=lambda r: r["rank"])
    n = rank0["world_size"]
    busbw = rank0["bytes"] / rank0["seconds"] * (2 * (n - 1) / n) / 1e9  # nccl-tests' bus bandwidth
    # The slowest link a ring crosses sets its pace: the network once the ranks span nodes.
    inter = len({r["node_rank"] for r in reports}) > 1
    link = f"{'inter' if inter else 'intra'}-node, {gpu}"
    measured = {"world_size": n, "backend": rank0["backend"], "bytes": rank0["bytes"], "seconds": rank0["seconds"],
                "busbw_gbps": busbw, "link": link, "assumed_gbps": links.inter_GBps if inter else links.intra_GBps,
                "assumed_source": links.source}
    out = merge(out)
    if not out:
        out.append(Result("allreduce", True, f"{n} ranks, bus bandwidth {busbw:.2f} GB/s", details=measured))
    return out, measured
