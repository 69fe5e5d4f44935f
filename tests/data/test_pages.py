"""Reading a memory-mapped Arrow file leaves no more of it resident than the pass is reading."""

from __future__ import annotations

import pickle
import sys

import datasets
import numpy as np
import pytest

from lightning_ft.data import pages
from lightning_ft.data.pages import MappedPages, Releasing, dataset_files

linux = pytest.mark.skipif(not sys.platform.startswith("linux") or pages._MADVISE is None, reason="Linux madvise")


def _mapped_kb(path: str) -> int:
    """Resident kB of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = len(fields) == 6 and fields[5] == path
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.fixture
def mapped(tmp_path):
    rows = 2000
    data = datasets.Dataset.from_dict({"x": [np.full(4096, i, dtype=np.int32) for i in range(rows)]})
    data.save_to_disk(str(tmp_path / "saved"))
    loaded = datasets.load_from_disk(str(tmp_path / "saved"))  # memory-mapped, 32 MB
    [path] = dataset_files(loaded)
    return loaded, path


@linux
def test_release_drops_the_resident_pages_and_keeps_the_data(mapped):
    data, path = mapped
    for batch in data.with_format("numpy").iter(batch_size=500):  # touch every page
        assert batch["x"].shape == (500, 4096)
    assert _mapped_kb(path) > 24_000
    MappedPages([path]).release()
    assert _mapped_kb(path) < 1_000
    assert int(data.with_format("numpy")[1999]["x"][0]) == 1999  # read again from the page cache


@linux
def test_a_pass_that_ticks_stays_small(mapped, monkeypatch):
    data, path = mapped
    monkeypatch.setattr(pages, "EVERY", 2)
    release, peak = MappedPages([path]), 0
    for batch in data.with_format("numpy").iter(batch_size=100):
        assert len(batch["x"]) == 100
        release.tick()
        peak = max(peak, _mapped_kb(path))
    assert peak < 8_000  # about two batches of 1.6 MB resident at a time, of a 32 MB file


def test_releasing_map_function_pickles_and_maps_like_the_function(mapped):
    data, _ = mapped
    function = Releasing(lambda batch: {"y": [int(x[0]) * 2 for x in batch["x"]]}, data)
    again = pickle.loads(pickle.dumps(Releasing(len, data)))
    assert again.files == dataset_files(data) and again._pages is None
    assert data.map(function, batched=True, batch_size=250, remove_columns=["x"])["y"] == [2 * i for i in range(2000)]
    assert Releasing(len, datasets.Dataset.from_dict({"x": [1]})).files == []  # held in memory: nothing to release
