"""Check a data directory against its meta.json, and copy it to node-local storage.

    python -m ds_gpt.stage --verify data/openwebtext                    # sizes and sha256 vs meta.json
    python -m ds_gpt.stage --src data/openwebtext --dst $SLURM_TMPDIR/openwebtext

slurm/ds_train.sh runs the copy once per node (`srun --ntasks-per-node=1`) when STAGE_DATA=1,
then trains from the copy. A copy is hashed as it is written (one pass over the network
file system, not two), goes in under a temporary name, and is renamed only once its size and
sha256 agree with meta.json; meta.json goes in last, so a staged directory with a meta.json is
a complete one. Any failure is one line naming the node, and exit 2.

No torch here: this runs on every node before the trainer starts.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

from ds_gpt import atomic
from ds_gpt.errors import ArgumentParser, UserError, os_error, run_cli
from ds_gpt.fileset import file_digest, staged_path
from ds_gpt.preflight_checks import human

BINS = ("train.bin", "val.bin")
META = "meta.json"
TOKEN_BYTES = 2  # uint16 ids
CHUNK = 16 << 20
PREPARE_HINT = "python -m ds_gpt.prepare writes train.bin, val.bin and meta.json together"


def node_name() -> str:
    """The SLURM node name where SLURM knows it (several "nodes" can share a host), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _meta_shape_problems(meta: object) -> list[str]:
    """What in a parsed meta.json is not of the shape prepare writes (what every reader relies on)."""
    if not isinstance(meta, dict):
        return [f"it holds {type(meta).__name__}, not a JSON object"]
    problems = []
    if "vocab_size" in meta and not (isinstance(meta["vocab_size"], int) and not isinstance(meta["vocab_size"], bool)
                                     and meta["vocab_size"] > 0):
        problems.append(f"vocab_size must be a positive integer (got {json.dumps(meta['vocab_size'])})")
    for key in ("dtype", "dataset", "tokenizer", "tokenizer_sha256"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            problems.append(f"{key} must be a string (got {json.dumps(meta[key])})")
    splits = meta.get("splits", {})
    if not isinstance(splits, dict):
        return [*problems, f"splits must be an object of train and val (got {json.dumps(splits)})"]
    for name, split in splits.items():
        if not isinstance(split, dict):
            problems.append(f"splits.{name} must be an object (got {json.dumps(split)})")
            continue
        for key in ("tokens", "bytes"):
            value = split.get(key)
            if key in split and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                problems.append(f"splits.{name}.{key} must be a count (got {json.dumps(value)})")
        if split.get("sha256") is not None and not isinstance(split["sha256"], str):
            problems.append(f"splits.{name}.sha256 must be a string (got {json.dumps(split['sha256'])})")
    return problems


def read_meta(data_dir: str | os.PathLike) -> dict | None:
    """A data directory's meta.json, checked for shape once here for every reader; None when there is
    none (nanoGPT's bins come without one)."""
    meta_path = Path(data_dir) / META
    try:
        meta = json.loads(atomic.read_text(meta_path))
    except FileNotFoundError:
        return None
    except OSError as err:  # unreadable, a directory: one line where the node probes catch UserErrors
        raise os_error(err) from None
    except json.JSONDecodeError as err:
        raise UserError(f"{meta_path} is not valid JSON ({err.msg})", hint=PREPARE_HINT) from None
    problems = _meta_shape_problems(meta)
    if problems:
        raise UserError(f"{meta_path} is not a ds_gpt meta.json: {'; '.join(problems)}", hint=PREPARE_HINT)
    return meta


def expected_files(data_dir: str | os.PathLike) -> dict[str, dict]:
    """{file name: {"bytes": size, "sha256": hex or None}} for train.bin and val.bin, from meta.json."""
    meta_path = Path(data_dir) / META
    meta = read_meta(data_dir)
    if meta is None:
        raise UserError(f"{meta_path} not found: the data cannot be verified", hint=PREPARE_HINT)
    files = {}
    for name in BINS:
        split = meta.get("splits", {}).get(name.removesuffix(".bin")) or {}
        if "tokens" not in split:
            raise UserError(f"{meta_path} gives no token count for {name}", hint=PREPARE_HINT)
        files[name] = {"bytes": TOKEN_BYTES * split["tokens"], "sha256": split.get("sha256")}
    return files


def verify(data_dir: str | os.PathLike, checksum: bool) -> dict:
    """Sizes (always) and sha256 (when `checksum`) of train.bin and val.bin against meta.json.

    Without a meta.json (nanoGPT's bins) the files need only be there, readable and of even
    size. Returns {"bytes", "sha256_checked", "meta"}; the first problem is a UserError.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"data directory {root} not found", hint=PREPARE_HINT)
    has_meta = (root / META).exists()  # nanoGPT's bins come without one, and train all the same
    wanted = expected_files(root) if has_meta else {name: {"bytes": None, "sha256": None} for name in BINS}
    hashed = checksum and has_meta and all(w["sha256"] for w in wanted.values())
    total = 0
    for name, w in wanted.items():
        path = root / name
        try:
            size = path.stat().st_size
            if w["bytes"] is not None and size != w["bytes"]:
                raise UserError(f"{path} has {size} bytes but meta.json says {w['bytes']}: truncated or from "
                                "another run", hint=PREPARE_HINT)
            if size % TOKEN_BYTES:
                raise UserError(f"{path} has an odd size ({size} bytes): not uint16 tokens", hint=PREPARE_HINT)
            if hashed:
                if file_digest(path)["sha256"] != w["sha256"]:
                    raise UserError(f"{path}: sha256 differs from meta.json: the file is corrupt", hint=PREPARE_HINT)
            else:
                with open(path, "rb") as fh:  # readable, not just listed
                    fh.read(1)
        except FileNotFoundError:
            raise UserError(f"{path} not found", hint=PREPARE_HINT) from None
        except PermissionError:
            raise UserError(f"{path} is not readable (permission denied)") from None
        total += size
    return {"bytes": total, "sha256_checked": hashed, "meta": has_meta}


# -----------------------------------------------------------------------------
# staging


def _copy_hashed(src: Path, dst: Path, want: dict) -> None:
    """Copy src to dst through a temporary name, hashing the bytes on the way; rename once they check."""
    tmp = staged_path(dst.parent, dst.name)
    digest = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(CHUNK):
                digest.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        size = tmp.stat().st_size
        if size != want["bytes"]:
            raise UserError(f"copy of {src} holds {size} bytes, meta.json says {want['bytes']}",
                            hint="the source changed or is truncated; re-run python -m ds_gpt.prepare")
        if want["sha256"] and digest.hexdigest() != want["sha256"]:
            raise UserError(f"copy of {src}: sha256 differs from meta.json", hint="the source file is corrupt")
        os.replace(tmp, dst)
    except OSError as err:
        raise UserError(f"copying {src} to {dst.parent} failed: {err.strerror or err}",
                        hint="STAGE_DIR must be node-local storage with room for the data") from None
    finally:
        tmp.unlink(missing_ok=True)


def is_staged(src: Path, dst: Path) -> bool:
    """A complete earlier copy (same meta.json, every file verified) needs no second copy."""
    try:
        if (dst / META).read_bytes() != (src / META).read_bytes():
            return False
        verify(dst, checksum=True)
        return True
    except (OSError, UserError):
        return False


def stage(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Copy train.bin, val.bin and meta.json from `src` to `dst`, verified against src's meta.json."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise UserError(f"staging {src} onto itself", hint="STAGE_DIR must differ from DATA_DIR")
    wanted = expected_files(src)
    if not all(w["sha256"] for w in wanted.values()):
        raise UserError(f"{src / META} has no sha256 for every split: a copy could not be verified",
                        hint=PREPARE_HINT)
    total = sum(w["bytes"] for w in wanted.values())
    if is_staged(src, dst):
        return {"node": node_name(), "dst": str(dst), "bytes": total, "copied": False}
    try:
        dst.mkdir(parents=True, exist_ok=True)
        (dst / META).unlink(missing_ok=True)  # no meta.json vouches for a half-done copy
        free = shutil.disk_usage(dst).free + sum((dst / n).stat().st_size for n in BINS if (dst / n).exists())
    except OSError as err:
        raise UserError(f"cannot create {dst}: {err.strerror or err}",
                        hint="set STAGE_DIR to node-local storage") from None
    if free < total:
        raise UserError(f"{dst} has {human(free)} free, the data needs {human(total)}",
                        hint="set STAGE_DIR to a larger node-local disk, or train without STAGE_DATA=1")
    for name, want in wanted.items():
        _copy_hashed(src / name, dst / name, want)
    atomic.write_text(dst / META, (src / META).read_text())
    return {"node": node_name(), "dst": str(dst), "bytes": total, "copied": True}


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m ds_gpt.stage", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", help="data directory to copy (train.bin, val.bin, meta.json)")
    ap.add_argument("--dst", help="node-local directory to copy it to")
    ap.add_argument("--verify", metavar="DIR", help="only check DIR's files against its meta.json")
    args = ap.parse_args(argv)
    if args.verify:
        report = verify(args.verify, checksum=True)
        print(f"{args.verify}: {report['bytes']} bytes, sizes and sha256 agree with meta.json")
        return 0
    if not (args.src and args.dst):
        raise UserError("give --src and --dst, or --verify DIR")
    report = stage(args.src, args.dst)
    what = "copied and verified" if report["copied"] else "already staged and verified"
    print(f"ds_gpt.stage: {report['node']}: {args.src} -> {args.dst}: {human(report['bytes'])} {what}",
          flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main, prog=f"ds_gpt.stage: {node_name()}")
