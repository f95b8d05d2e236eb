"""What the console shows a user: the libraries' lines that would mislead are filtered at their source."""
from __future__ import annotations

from ds_gpt.corpus import Source, load_documents


def test_a_local_corpus_shows_no_downloading_bar(tmp_path, capfd):
    """datasets "downloads" local files too, and from 16 files on draws a "Downloading data" bar."""
    files = []
    for i in range(16):
        files.append(tmp_path / f"doc{i:02}.txt")
        files[-1].write_text(f"Document {i}.")
    ds = load_documents(Source("custom", "text", tuple(map(str, files))), hf_cache=str(tmp_path / "hf"))
    err = capfd.readouterr().err
    assert len(ds) == 16 and "Downloading" not in err , err
