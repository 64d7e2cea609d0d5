"""Fuzzing the GGUF path (issue 21): transformers parses a GGUF file for lowbit's config, tokenizer
and weights; a damaged one must give one ModelLoadError line or load, never another exception, a
hang or a huge allocation. Mutations: truncation and flipped bytes in the header/metadata or anywhere.
``LOWBIT_FUZZ=long`` runs longer (see packages/exporters/tests/test_fuzz_readers.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lowbit import LowbitError  # noqa: E402
from lowbit.loading import load_config, load_model, load_tokenizer, resolve  # noqa: E402
from lowbit.testing.faults import bounded, write_tiny_gguf  # noqa: E402

LONG = os.environ.get("LOWBIT_FUZZ") == "long"
PROFILE = settings(max_examples=int(os.environ.get("LOWBIT_FUZZ_EXAMPLES", "500")) if LONG else 15,
                   derandomize=not LONG, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def seed_gguf(tmp_path_factory):
    import gguf

    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path, gguf.GGUFReader(str(path)).data_offset


def load_all(path: Path) -> None:
    src = resolve(str(path))
    load_config(src)
    load_tokenizer(src)
    load_model(src)


def test_the_seed_loads(seed_gguf, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", "off")
    load_all(seed_gguf[0])


def test_gguf_loading_survives_mutations(seed_gguf, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", "off")  # no conversion cache: every example parses its own file
    seed, data_offset = seed_gguf
    size = seed.stat().st_size

    @PROFILE
    @given(kind=st.sampled_from(["truncate", "header", "anywhere"]), data=st.data())
    def fuzz(kind, data):
        with tempfile.TemporaryDirectory() as tmp:
            f = Path(shutil.copy(seed, Path(tmp) / "m.gguf"))
            raw = bytearray(f.read_bytes())
            if kind == "truncate":
                raw = raw[: data.draw(st.integers(0, size - 1), label="keep")]
            else:
                hi = data_offset if kind == "header" else size
                for pos, mask in data.draw(st.lists(st.tuples(st.integers(0, hi - 1), st.integers(1, 255)),
                                                    min_size=1, max_size=4), label="flips"):
                    raw[pos] ^= mask
            f.write_bytes(bytes(raw))
            try:
                with bounded(seconds=30):
                    load_all(f)
            except LowbitError as err:
                msg = str(err)
                assert msg and "\n" not in msg, f"not one line: {msg!r}"
                assert "allocate" not in msg, msg

    fuzz()
