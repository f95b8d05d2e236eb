"""sample.py's prompt handling (sampling itself runs against real checkpoints in test_train.py)."""
from __future__ import annotations

import pytest

from ds_gpt.errors import UserError
from ds_gpt.sample import read_prompt


def test_start_text_or_file_as_nanogpt(tmp_path):
    (tmp_path / "prompt.txt").write_text("Joe Biden and Donald Trump\n", encoding="utf-8")
    assert read_prompt(f"FILE:{tmp_path / 'prompt.txt'}") == "Joe Biden and Donald Trump\n"
    assert read_prompt("ROMEO:") == "ROMEO:"
    with pytest.raises(UserError, match="missing.txt not found"):
        read_prompt(f"FILE:{tmp_path / 'missing.txt'}")
