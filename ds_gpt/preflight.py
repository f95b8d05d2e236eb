"""Check a cluster before a run starts: one named line per problem, before any GPU-hour is spent.

    python -m ds_gpt.preflight --hostfile hostfiles/narval --data_dir data/openwebtext --out_dir out/gpt2-124m
    python -m ds_gpt.preflight --data_dir D --out_dir O              # inside an allocation: its hostfile
    python -m ds_gpt.preflight --launcher srun --data_dir D --out_dir O -- --n_layer 24 --keep_last 3

Arguments after `--` are the trainer's (ds_gpt/train.py), passed as the run will get them: they
give the model (--model or the shape flags), precision, ZeRO stage and keep_last that size a
checkpoint (and --data_dir/--out_dir when not given here). slurm/ds_train.sh runs this before
every launch, with the trainer arguments of the run it is about to start. The checks, in order:

  hostfile  its hosts and slots against the allocation (SLURM_JOB_NODELIST, tasks, GPUs per node)
  env       the DS_ENV_FILE (or ~/.deepspeed_env) carries what the ranks need over ssh
  ssh       every host answers the launcher's transport without a password (ssh BatchMode)
  repo, python   the same repository path and interpreter (and torch, deepspeed) on every host
  master    the master address resolves on every host;  port: the master port is free there
  data      train.bin/val.bin readable on every host, sizes (and sha256) as meta.json says
  out_dir   writable on every host, one filesystem for all, room for keep_last + 1 checkpoints
  allreduce one all-reduce over every rank through the real launcher and backend (gloo on CPU,
            NCCL on GPUs), with the bus bandwidth it reached; run when every other check passed

Exit 0 with one summary line; exit 2 with one `check: hosts: problem (HINT: fix)` line per
failed check. `--json FILE` writes every check and measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

from ds_gpt import atomic, config
from ds_gpt.errors import EXIT_USER_ERROR, ArgumentParser, RawDescriptionHelpFormatter, UserError, run_cli
from ds_gpt.hostfile import read_hostfile
from ds_gpt.launch_env import DEFAULT_MPI_PORT, slurm_port
from ds_gpt.paths import REPO_ROOT
from ds_gpt.plan import gpt_num_params
from ds_gpt.plan_comm import LINKS
from ds_gpt.preflight_checks import (
    NO_PYTHON,
    NO_REPO,
    Result,
    allocation_results,
    env_file_results,
    human,
    judge_allreduce,
    judge_probes,
    read_allocation,
    wanted_env,
)
from ds_gpt.preflight_node import CHECKSUM_AUTO_LIMIT, parse_reports, versions
from ds_gpt.run_config import ds_dtype, ds_zero_stage, load_ds_config

PROG = "ds_gpt.preflight"
PASS_THROUGH = """trainer arguments:
  Everything after `--` is the trainer's command line (python -m ds_gpt.train --help lists it),
  checked here as the run will parse it. It sets what the checks size and look at:
  the model (--model, or --n_layer/--n_head/--n_embd) and its checkpoint size,
  --deepspeed_config (ZeRO stage, precision), --keep_last, and --data_dir/--out_dir when
  they are not given before the `--`. Example:
    python -m ds_gpt.preflight --data_dir data/openwebtext -- --model 350M --deepspeed_config ds_configs/zero2.json
A preflight creates nothing: an --out_dir it had to make for its write test is removed again."""
SSH = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]


# -----------------------------------------------------------------------------
# what to check: hosts, model, directories


def hostfile_entries(path: str | None, environ: Mapping[str, str]) -> list[tuple[str, int]]:
    """The given hostfile, or the allocation's, written by ds_gpt.hostfile as slurm/ds_train.sh does."""
    if path:
        return read_hostfile(path)
    if not environ.get("SLURM_JOB_NODELIST"):
        raise UserError("no --hostfile and no allocation (SLURM_JOB_NODELIST is unset)",
                        hint="pass --hostfile FILE, or run inside salloc/sbatch")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hostfile"
        proc = subprocess.run([sys.executable, "-m", "ds_gpt.hostfile", "--out", str(out)], cwd=REPO_ROOT,
                              env=dict(environ), capture_output=True, text=True)
        if proc.returncode:
            raise UserError(f"python -m ds_gpt.hostfile failed: {' '.join(proc.stderr.split()[-30:])}")
        return read_hostfile(out)


def checkpoint_bytes(n_params: int, dtype: str, zero_stage: int) -> int:
    """Bytes one DeepSpeed checkpoint of an AdamW-trained model takes, all ranks' files together.

    Optimizer state: fp32 master weights + Adam's two fp32 moments, 12 B/param, however ZeRO
    partitions them; except fp32 ZeRO-0, where Adam steps the module's own fp32 weights (8 B).
    Module weights in the training dtype (2 B bf16/fp16, 4 B fp32) beside them; except ZeRO-3,
    which saves its partitioned weights only as the fp32 master copy. So: bf16 ZeRO-0..2 14,
    fp32 ZeRO-1/2 16, fp32 ZeRO-0 12, ZeRO-3 12 B/param. Measured (DeepSpeed 0.19.8, a 2.64 M
    parameter model): 12.0, 14.0, 16.0, 14.0, 12.0, 12.0 B/param for ZeRO-0/1/3 x fp32/bf16.
    """
    module = 0 if zero_stage >= 3 else (2 if dtype in ("bfloat16", "float16") else 4)
    master = 0 if (zero_stage == 0 and module == 4) else 4
    return n_params * (module + master + 8)


def model_checkpoint(cfg: config.TrainConfig) -> dict:
    """The model's parameter count, precision, ZeRO stage and the bytes one checkpoint takes."""
    n_layer, n_head, n_embd = cfg.n_layer, cfg.n_head, cfg.n_embd  # --model fills them in
    ds = load_ds_config(cfg.deepspeed_config)
    dtype = cfg.dtype or ds_dtype(ds)
    stage = cfg.zero_stage if cfg.zero_stage is not None else ds_zero_stage(ds)
    n_params = gpt_num_params(n_layer, n_embd, cfg.vocab_size, cfg.block_size, cfg.bias, non_embedding=False)
    return {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "n_params": n_params, "dtype": dtype,
            "zero_stage": stage, "checkpoint_bytes": checkpoint_bytes(n_params, dtype, stage)}


# -----------------------------------------------------------------------------
# running things on the hosts


def probe_argv(host: str | None, master: str, port: int, args: argparse.Namespace, token: str | None,
               env_names: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "ds_gpt.preflight_node", "probe", "--master_addr", master, "--port", str(port),
            "--data_dir", os.path.abspath(args.data_dir), "--out_dir", os.path.abspath(args.out_dir),
            "--env", ",".join(env_names)]
    if host:
        argv += ["--node", host]
    argv += ["--checksum", args.checksum]
    if token:
        argv += ["--token", token]
    return argv


def run_probe(host: str, argv: list[str], timeout_s: float) -> dict:
    """One host's probe report, or {"failed": exit code, "stderr": ...} when it could not run."""
    # The deepspeed launcher runs `cd <abs cwd>; <sys.executable> -u -m ...` on each host: so do we.
    script = (f"cd {shlex.quote(str(REPO_ROOT))} || exit {NO_REPO}; "
              f"test -x {shlex.quote(sys.executable)} || exit {NO_PYTHON}; exec {shlex.join(argv)}")
    cmd = [*SSH, host, script]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"failed": "timeout", "stderr": f"no answer in {timeout_s:.0f} s"}
    reports = parse_reports(proc.stdout)
    if proc.returncode or not reports:
        return {"failed": proc.returncode, "stderr": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return reports[0]


def probe_hosts(hosts: list[str], master: str, port: int, args: argparse.Namespace, token: str | None,
                env_names: list[str], transport: str) -> dict[str, dict]:
    """Every host's probe: over ssh in parallel, or in one srun step with a task per host."""
    if transport == "srun":
        argv = probe_argv(None, master, port, args, token, env_names)
        cmd = ["srun", f"--nodes={len(hosts)}", f"--ntasks={len(hosts)}", "--ntasks-per-node=1",
               f"--nodelist={','.join(hosts)}", *argv]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
            out, err = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as stop:
            out, err = stop.stdout or "", f"srun: no answer in {args.timeout_s:.0f} s"
            out = out.decode() if isinstance(out, bytes) else out
        found = {r["node"]: r for r in parse_reports(out)}
        last = (err.strip().splitlines() or ["(no output)"])[-1]
        return {h: found.get(h, {"failed": "srun", "stderr": last}) for h in hosts}
    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        futures = {h: pool.submit(run_probe, h, probe_argv(h, master, port, args, token, env_names), args.timeout_s)
                   for h in hosts}
        return {h: f.result() for h, f in futures.items()}


def run_allreduce(hostfile: str, hosts: list[str], master: str, port: int, args: argparse.Namespace,
                  env_names: list[str], environ: Mapping[str, str]) -> tuple[list[dict], str]:
    """One all-reduce through the launcher the run will use; (rank reports, output tail)."""
    rank_args = ["allreduce", "--size_mb", str(args.allreduce_mb), "--timeout_s", str(int(args.timeout_s)),
                 "--env", ",".join(env_names)]
    env = dict(environ)
    if args.launcher == "srun":
        env.update(MASTER_ADDR=master, MASTER_PORT=str(port))
        cmd = ["srun", "--kill-on-bad-exit=1", sys.executable, "-u", "-m", "ds_gpt.preflight_node", *rank_args]
    else:
        # deepspeed's launcher, behind the check that its command line reaches the nodes unchanged
        cmd = [sys.executable, "-m", "ds_gpt.remote_shell", "launch", "--hostfile", hostfile, "--master_addr", master,
               "--master_port", str(port), "--no_local_rank", "--module", "ds_gpt.preflight_node", *rank_args]
    # Its own session: on a timeout the launcher, pdsh and ssh go together (the ranks' alarm ends them).
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=args.timeout_s + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        out += f"\n(no result in {args.timeout_s + 30:.0f} s)"
    tail = " | ".join(line.strip() for line in out.strip().splitlines()[-3:])
    return parse_reports(out), tail


# -----------------------------------------------------------------------------
# the preflight


def parse_args(argv: list[str] | None, environ: Mapping[str, str]) -> tuple[argparse.Namespace, config.TrainConfig]:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = ArgumentParser(prog=f"python -m {PROG}", usage="%(prog)s [options] [-- TRAINER_ARGS ...]",
                        description=__doc__.split("\n\n")[0], epilog=PASS_THROUGH,
                        formatter_class=RawDescriptionHelpFormatter)
    ap.add_argument("--hostfile", help="DeepSpeed hostfile (default: the allocation's, as slurm/ds_train.sh writes it)")
    ap.add_argument("--data_dir", help="directory with train.bin, val.bin, meta.json (default: the trainer's)")
    ap.add_argument("--out_dir", help="the run directory (default: the trainer's)")
    ap.add_argument("--launcher", choices=("deepspeed", "srun"),
                    default=environ.get("DS_GPT_LAUNCH") or "deepspeed", help="how the run starts its ranks "
                    "(default: $DS_GPT_LAUNCH, else deepspeed)")
    ap.add_argument("--master_addr", help="rendezvous host (default: the first host)")
    ap.add_argument("--master_port", type=int, help="rendezvous port (default: $MASTER_PORT, else the one the "
                    "launcher derives from the job id, else 29500)")
    ap.add_argument("--keep_last", type=int, help="rolling checkpoints the run keeps (default: the trainer's)")
    ap.add_argument("--gpu", choices=list(LINKS), help="whose links the planner assumes, for the all-reduce's "
                    "comparison (default: the allocation's GPU type, else a100)")
    ap.add_argument("--checksum", choices=("auto", "always", "never"), default="auto",
                    help=f"sha256 of the data against meta.json: auto hashes up to {CHECKSUM_AUTO_LIMIT >> 30} GiB")
    ap.add_argument("--allreduce_mb", type=float, default=64.0, help="all-reduce message size in MiB")
    ap.add_argument("--timeout_s", type=float, default=60.0, help="how long a host or rank may take to answer")
    ap.add_argument("--json", help="write every check and measurement to this file")
    args = ap.parse_args(own)
    cfg = config.parse_args(train_argv)
    args.data_dir = args.data_dir or cfg.data_dir
    args.out_dir = args.out_dir or cfg.out_dir
    args.keep_last = cfg.keep_last if args.keep_last is None else args.keep_last
    if args.keep_last < 1:
        raise UserError(f"--keep_last {args.keep_last}: keep at least one checkpoint")
    if args.master_port is None:
        if environ.get("MASTER_PORT"):
            args.master_port = int(environ["MASTER_PORT"])
        else:
            args.master_port = slurm_port(environ) if environ.get("SLURM_JOB_ID") else DEFAULT_MPI_PORT
    return args, cfg


def write_token(out_dir: str) -> tuple[str | None, Result | None, Path | None]:
    """A file every host must see in out_dir: checkpoints need one filesystem for all ranks.

    Returns the token's name (None if it could not be written), the failure, and the topmost
    directory made for it (out_dir or an ancestor), which remove_made takes away again."""
    name = f".preflight-token-{uuid.uuid4().hex[:12]}"
    made = None
    for parent in (Path(out_dir).absolute(), *Path(out_dir).absolute().parents):
        if parent.exists():
            break
        made = parent
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        atomic.write_text(Path(out_dir) / name, name)
        return name, None, made
    except OSError as err:
        remove_made(out_dir, made)
        return None, Result("out_dir", False, f"cannot write {out_dir} here ({err.strerror})",
                            "pass a writable --out_dir on a filesystem every node shares", [socket.gethostname()]), None


def remove_made(out_dir: str, made: Path | None) -> None:
    """Remove the directories write_token made, deepest first, while they are empty: a preflight
    leaves no trace (the trainer creates its out_dir itself)."""
    if made is None:
        return
    for directory in (Path(out_dir).absolute(), *Path(out_dir).absolute().parents):
        try:
            directory.rmdir()
        except OSError:  # not empty (something else is there now), or gone
            return
        if directory == made:
            return


def preflight(args: argparse.Namespace, cfg: config.TrainConfig, environ: Mapping[str, str]) -> dict:
    start = time.monotonic()
    results: list[Result] = []
    alloc = read_allocation(environ)
    if args.launcher == "srun":
        if alloc is None:
            raise UserError("--launcher srun needs an allocation", hint="run inside salloc/sbatch")
        entries = [(h, alloc.tasks[h]) for h in alloc.nodes]
    else:
        entries = hostfile_entries(args.hostfile, environ)
    hosts = [h for h, _ in entries]
    results += allocation_results(entries, alloc, args.launcher)
    # A host outside the allocation is wrong already; probing it would only add noise.
    targets = [h for h in hosts if alloc is None or h in alloc.nodes]
    model = model_checkpoint(cfg)
    master = args.master_addr or hosts[0]
    # The deepspeed launcher checks ssh to the first host even when the hostfile names one host.
    transport = "srun" if args.launcher == "srun" else "ssh"
    env_wanted = wanted_env(environ)
    env_file = {}
    if transport == "ssh":
        if len(hosts) > 1 and shutil.which("pdsh") is None:
            results.append(Result("ssh", False, "pdsh not found: the deepspeed launcher starts remote ranks with it",
                                  "install pdsh (or `module load pdsh`), or launch with DS_GPT_LAUNCH=srun"))
        env_results, env_file = env_file_results(environ, env_wanted)
        results += env_results

    token, failure, made = write_token(args.out_dir)
    results += [failure] if failure else []
    try:
        probes = probe_hosts(targets, master, args.master_port, args, token, list(env_wanted), transport)
    finally:
        if token:
            (Path(args.out_dir) / token).unlink(missing_ok=True)
        remove_made(args.out_dir, made)
    need = (args.keep_last + 1) * model["checkpoint_bytes"]
    # The data as the nodes see it (it may be node-local, out of this host's sight).
    data = next((p["data"] for p in probes.values() if p.get("data", {}).get("ok")), {})
    results += judge_probes(probes, master, args.master_port, token, need, model, args.keep_last, versions(),
                            transport)

    allreduce: dict = {"skipped": "an earlier check failed"}
    if all(r.ok for r in results):
        with tempfile.TemporaryDirectory() as tmp:
            hostfile = Path(tmp) / "hostfile"
            hostfile.write_text("".join(f"{h} slots={n}\n" for h, n in entries))
            reports, tail = run_allreduce(str(hostfile), hosts, master, args.master_port, args, list(env_wanted),
                                          environ)
        world = sum(n for _, n in entries)
        gpu = args.gpu or (alloc.gpu_type if alloc and alloc.gpu_type in LINKS else "a100")
        checked, allreduce = judge_allreduce(reports, tail, world, hosts, env_wanted, gpu, LINKS[gpu])
        results += checked
    return {"ok": all(r.ok for r in results), "checks": [r.to_dict() for r in results], "hosts": dict(entries),
            "launcher": args.launcher, "transport": transport, "master": f"{master}:{args.master_port}",
            "data_dir": os.path.abspath(args.data_dir), "data_bytes": data.get("bytes"),
            "data_meta": data.get("meta"), "sha256_checked": data.get("sha256_checked"),
            "out_dir": os.path.abspath(args.out_dir), "keep_last": args.keep_last, "model": model,
            "free_bytes_needed": need, "env_file": env_file, "allreduce": allreduce,
            "seconds": round(time.monotonic() - start, 2)}


def summary(report: dict) -> str:
    hosts = report["hosts"]
    model, ar = report["model"], report["allreduce"]
    if not report["data_meta"]:
        data = "no meta.json: files present, sizes and sha256 unchecked"
    elif report["sha256_checked"]:
        data = "sizes and sha256 as meta.json says"
    else:
        data = f"sizes as meta.json says (sha256 skipped above {CHECKSUM_AUTO_LIMIT >> 30} GiB: --checksum always)"
    free = next(c["free_bytes"] for c in report["checks"] if c["check"] == "out_dir")
    line = (f"ok: {len(hosts)} host(s) x {'/'.join(str(n) for n in sorted(set(hosts.values())))} slot(s) "
            f"({','.join(hosts)}) via {report['transport']}; master {report['master']}; "
            f"data {human(report['data_bytes'] or 0)}, {data}; out_dir shared, {human(free)} free >= "
            f"{report['keep_last'] + 1} x {human(model['checkpoint_bytes'])} checkpoints "
            f"({model['n_params'] / 1e6:.1f}M params, {model['dtype']}, ZeRO-{model['zero_stage']})")
    if "busbw_gbps" in ar:
        line += (f"; all-reduce {ar['bytes'] / 2**20:.0f} MiB over {ar['world_size']} ranks ({ar['backend']}): "
                 f"bus bandwidth {ar['busbw_gbps']:.2f} GB/s, the planner assumes {ar['assumed_gbps']:g} GB/s "
                 f"({ar['link']})")
    return f"{line}; {report['seconds']:.0f} s"


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    args, cfg = parse_args(argv, environ)
    report = preflight(args, cfg, environ)
    if args.json:
        try:  # its directory too: slurm/ds_train.sh asks for OUT_DIR/preflight.json before the run makes OUT_DIR
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(args.json, json.dumps(report, indent=1) + "\n")
        except OSError as err:
            print(f"{PROG}: could not write {args.json}: {err.strerror}", file=sys.stderr)
    if report["ok"]:
        print(f"{PROG}: {summary(report)}", flush=True)
        return 0
    for check in report["checks"]:
        if not check["ok"]:
            print(f"{PROG}: {check['line']}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    run_cli(main, prog=PROG)
