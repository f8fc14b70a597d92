"""bench/image_encoding.py runs and prints one row per group, side and encoding, JPEG the smaller."""

from __future__ import annotations

import pytest

from bench.image_encoding import main, rows


def test_a_small_run_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--groups", "2", "3", "--sides", "64", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| G | side | encoding |") and len(lines) == 2 + 4
    assert "| 3 | 64 | JPEG q75 |" in lines[4] and "| 3 | 64 | PNG |" in lines[5]


def test_the_release_encoding_is_the_smaller_and_the_faster() -> None:
    jpeg, png = rows([4], [256], repeats=1)
    assert (jpeg.encoding, png.encoding) == ("JPEG q75", "PNG")
    assert jpeg.group_kib * 5 < png.group_kib and jpeg.group_ms < png.group_ms
