import pytest

from lowbit.plugins import reset_plugin_manager


@pytest.fixture
def fresh_plugins(monkeypatch):
    """Reload plugins and selection caches around a test that changes LOWBIT_* switches."""
    reset_plugin_manager()
    yield monkeypatch
    monkeypatch.undo()
    reset_plugin_manager()
