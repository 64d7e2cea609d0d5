import pytest

from lowbit.testing.models import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny seeded llama with a byte-level BPE tokenizer, saved as an HF directory."""
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Each test sees plugins loaded under its own LOWBIT_* environment."""
    from lowbit.plugins import reset_plugin_manager

    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_dir):
    """A lowbit checkpoint of the tiny llama (RTN w4 g32, no calibration: fast)."""
    from lowbit import pipeline
    from lowbit.scheme import QuantScheme

    out = tmp_path_factory.mktemp("ckpt") / "q"
    pipeline.quantize(str(tiny_dir), method="rtn", scheme=QuantScheme(4, 32), out=out, progress=False)
    return out / "lowbit"
