"""Which revision of a Hub dataset `datasets` 5 can load, and how.

`datasets` 4 and later refuse loading scripts ("Dataset scripts are no longer supported"), and
`Skylion007/openwebtext` was one: its main revision held `openwebtext.py` and tarballs. Its
maintainer has since uploaded the corpus as parquet (`data/train-000NN-of-00093.parquet`) and
the script was deleted from main; the Hub's own parquet conversion (the `refs/convert/parquet`
revision) covers only the first 5 GB of a split this large (`partial-train`). docs/data.md cites
the sources. So, in order:

    1. main without a loading script: load it as it is (its README says where its files are);
    2. main with a script but with parquet files beside it: read those with the parquet builder;
    3. refs/convert/parquet with the whole split (`<subset>/train/*.parquet`): read those;
    4. otherwise one line naming what was found, and the --data_files way round it.

`choose` is that rule, a pure function of the file listings (tested offline); `resolve` asks the
Hub for the listings. Either way the commit is pinned, so a prepare reads one fixed revision and
meta.json records it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from ds_gpt.errors import UserError

CONVERTED = "refs/convert/parquet"  # the Hub's parquet conversion lives on this revision
LOCAL_HINT = "pass a local copy in the Hub's schema with --data_files 'DIR/*.parquet'"
OFFLINE_HINT = f"run it where the Hub is reachable (a login node), or {LOCAL_HINT}"


@dataclass(frozen=True)
class Listing:
    """One revision of a Hub dataset repository: its commit and the paths of its files."""
    sha: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class Choice:
    """What load_dataset gets: the repo itself (`data_files` empty) or the parquet files of one
    revision through the parquet builder; `revision` is a commit in both cases."""
    repo: str
    revision: str
    data_files: tuple[str, ...] = ()
    how: str = "main"  # "main", "main parquet" or "converted": said in meta.json and the console

    @property
    def builder(self) -> str:
        """load_dataset's `path`: the parquet builder over `data_files`, else the repo itself."""
        return "parquet" if self.data_files else self.repo


def _scripts(files: tuple[str, ...]) -> list[str]:
    return [f for f in files if "/" not in f and f.endswith(".py")]  # a loading script sits at the top


def _url(repo: str, sha: str, path: str) -> str:
    return f"hf://datasets/{repo}@{sha}/{path}"


def choose(repo: str, subset: str | None, main: Listing, converted: Listing | None) -> Choice:
    """The revision to load (the rule in the module docstring); a UserError where none will do."""
    scripts = _scripts(main.files)
    if not scripts:
        return Choice(repo, main.sha)
    parquet = sorted(f for f in main.files if f.endswith(".parquet"))
    if parquet:
        return Choice(repo, main.sha, tuple(_url(repo, main.sha, f) for f in parquet), "main parquet")
    if converted is not None:
        by_split: dict[str, list[str]] = {}
        for f in converted.files:
            parts = PurePosixPath(f).parts
            if f.endswith(".parquet") and len(parts) == 3 and (subset is None or parts[0] == subset):
                by_split.setdefault(parts[1], []).append(f)
        if by_split.get("train"):
            return Choice(repo, converted.sha, tuple(_url(repo, converted.sha, f) for f in sorted(by_split["train"])),
                          "converted")
        if by_split.get("partial-train"):
            raise UserError(f"{repo}: main holds only the loading script {scripts[0]}, which datasets 5 refuses, "
                            f"and the Hub's parquet conversion ({CONVERTED}) holds only the first 5 GB of it "
                            "(partial-train)", hint=LOCAL_HINT)
    raise UserError(f"{repo}: main holds only the loading script {scripts[0]}, which datasets 5 refuses, and "
                    f"the Hub has no parquet copy of it ({CONVERTED} not found)",
                    hint=LOCAL_HINT)


def _listing(repo: str, revision: str) -> Listing:
    from huggingface_hub import HfApi

    info = HfApi().dataset_info(repo, revision=revision)
    return Listing(info.sha, tuple(s.rfilename for s in info.siblings or ()))


def resolve(repo: str, subset: str | None) -> Choice:
    """Ask the Hub for main (and, only where main is a bare script, for the converted revision)."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        main = _listing(repo, "main")
        converted = None
        if _scripts(main.files) and not any(f.endswith(".parquet") for f in main.files):
            try:
                converted = _listing(repo, CONVERTED)
            except RevisionNotFoundError:
                pass
    except UserError:
        raise
    except Exception as err:  # offline mode, DNS, proxy, HTTP 4xx/5xx: all say "not reachable from here"
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"cannot list {repo} on the Hugging Face Hub: {type(err).__name__}: {first}",
                        hint=OFFLINE_HINT) from None
    return choose(repo, subset, main, converted)
