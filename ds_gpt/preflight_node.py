"""What `python -m ds_gpt.preflight` runs on the nodes: a probe per node, and one all-reduce.

    python -m ds_gpt.preflight_node probe --node node2 --master_addr node1 --data_dir D --out_dir O ...
    deepspeed --hostfile H --no_local_rank --module ds_gpt.preflight_node allreduce --size_mb 64 ...
    srun python -m ds_gpt.preflight_node allreduce --size_mb 64 ...

Each process prints one line, MARKER followed by a JSON object, and exits 0 whatever it found:
judging the facts is the preflight's job, on the node that started it. The probe imports no
torch (it must answer in about a second); the all-reduce rank does.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path

from ds_gpt.errors import UserError
from ds_gpt.paths import REPO_ROOT
from ds_gpt.stage import expected_files, node_name, verify

MARKER = "DS_GPT_PREFLIGHT "
# --checksum auto hashes train.bin + val.bin up to this size: ~2 s at the 1.3 GB/s one core
# hashes from the page cache. OpenWebText's 17 GB would take 15-60 s on every node at once.
CHECKSUM_AUTO_LIMIT = 2 << 30


def emit(report: dict) -> None:
    # One write() per line: ranks and pdsh share one pipe.
    os.write(1, (MARKER + json.dumps(report) + "\n").encode())


def parse_reports(text: str) -> list[dict]:
    """The JSON objects in a command's output, wherever pdsh's `host: ` prefix or other lines put them."""
    reports = []
    for line in text.splitlines():
        _, sep, payload = line.partition(MARKER)
        if sep:
            try:
                reports.append(json.loads(payload))
            except json.JSONDecodeError:
                continue
    return reports


def versions() -> dict:
    found = {"python": sys.version.split()[0]}
    for package in ("torch", "deepspeed"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


# -----------------------------------------------------------------------------
# probe: this node's view of the names, ports and directories a run needs


def resolve(host: str) -> dict:
    try:
        addrs = sorted({info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
        return {"addrs": addrs}
    except socket.gaierror as err:
        return {"error": err.strerror}


def port_free(port: int) -> dict:
    """Can a rendezvous server listen on `port` here? (SO_REUSEADDR as torch's TCPStore sets it.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as err:
            return {"free": False, "error": os.strerror(err.errno) if err.errno else str(err)}
    return {"free": True}


def probe_data(data_dir: str, checksum: str) -> dict:
    """verify() with sha256 when asked (`always`), or (`auto`) when meta.json's files are small."""
    hashed = checksum == "always"
    if checksum == "auto":
        try:
            hashed = sum(w["bytes"] for w in expected_files(data_dir).values()) <= CHECKSUM_AUTO_LIMIT
        except UserError:
            hashed = False  # no meta.json, or a bad one: verify() tells which
    try:
        return {"ok": True, **verify(data_dir, hashed)}
    except UserError as err:
        return {"ok": False, "error": err.args[0], "hint": err.hint}


def probe_out_dir(out_dir: str, token_name: str | None) -> dict:
    """Write, fsync and remove a file in out_dir; read the token the preflight wrote there."""
    root = Path(out_dir)
    found: dict = {}
    try:
        usage = os.statvfs(root)
        found["free_bytes"] = usage.f_bavail * usage.f_frsize
    except OSError as err:
        return {"writable": False, "error": f"{root}: {err.strerror}"}
    probe = root / f".preflight-{node_name()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"x" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
        found["writable"] = True
    except OSError as err:
        found.update(writable=False, error=f"{root}: {err.strerror}")
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    if token_name:
        try:
            found["token"] = (root / token_name).read_text()
        except OSError:
            found["token"] = None
    return found


def probe(args: argparse.Namespace) -> dict:
    report = {"node": args.node or node_name(), "hostname": socket.gethostname(), "python": sys.executable,
              "repo": str(REPO_ROOT), "versions": versions(), "master": resolve(args.master_addr)}
    if args.port:
        report["port"] = port_free(args.port)
    if args.data_dir:
        report["data"] = probe_data(args.data_dir, args.checksum)
    if args.out_dir:
        report["out_dir"] = probe_out_dir(args.out_dir, args.token)
    report["env"] = {name: os.environ.get(name) for name in args.env.split(",") if name}
    return report


# -----------------------------------------------------------------------------
# all-reduce: one rank of a tiny torch.distributed job on the real backend


def allreduce(args: argparse.Namespace) -> dict:
    from datetime import timedelta

    from ds_gpt import launch_env

    env = launch_env.detect()
    launch_env.export(env)
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", env.local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout_s), rank=env.rank,
                            world_size=env.world_size)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # Correctness first: every rank contributes its rank + 1.
    check = torch.full((1024,), float(env.rank + 1), device=device)
    dist.all_reduce(check)
    sync()
    correct = bool((check == env.world_size * (env.world_size + 1) / 2).all())
    n = max(1, int(args.size_mb * 2**20) // 4)
    buf = torch.ones(n, dtype=torch.float32, device=device)
    dist.all_reduce(buf)  # warm-up: connections, buffers
    sync()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        dist.all_reduce(buf)
    sync()
    seconds = torch.tensor([(time.perf_counter() - t0) / args.iters], dtype=torch.float64, device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    dist.destroy_process_group()
    return {"rank": env.rank, "node_rank": env.node_rank, "local_rank": env.local_rank,
            "world_size": env.world_size, "launcher": env.launcher, "hostname": socket.gethostname(),
            "node": os.environ.get("SLURMD_NODENAME"), "backend": backend, "device": str(device),
            "correct": correct, "bytes": 4 * n, "seconds": float(seconds.item()),
            "python": sys.executable, "env": {name: os.environ.get(name) for name in args.env.split(",") if name}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ds_gpt.preflight_node")
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("probe", help="this node's view of the run's names, port and directories")
    p.add_argument("--node", help="the name the preflight reached this node by")
    p.add_argument("--master_addr", required=True)
    p.add_argument("--port", type=int, help="check that this port is free here (on the master)")
    p.add_argument("--data_dir")
    p.add_argument("--checksum", choices=("auto", "always", "never"), default="auto",
                   help="sha256 of the data against meta.json (auto: when small)")
    p.add_argument("--out_dir")
    p.add_argument("--token", help="a file in out_dir the preflight wrote: is it visible here?")
    p.add_argument("--env", default="", help="comma-separated variables to report")
    a = sub.add_parser("allreduce", help="one rank of an all-reduce over the launcher's ranks")
    a.add_argument("--size_mb", type=float, default=64.0)
    a.add_argument("--iters", type=int, default=5)
    a.add_argument("--timeout_s", type=int, default=60)
    a.add_argument("--env", default="", help="comma-separated variables to report")
    args = ap.parse_args(argv)
    if args.what == "probe":
        emit(probe(args))
        return 0
    # A rank that cannot reach its peers must not outlive the preflight that waits for it.
    import signal
    signal.alarm(args.timeout_s + 30)
    emit(allreduce(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
