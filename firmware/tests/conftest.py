"""Fixtures of the firmware tests."""

import pytest


@pytest.fixture(autouse=True)
def _media_root(settings, tmp_path):
    """Artifacts stored by in-process tests go to a directory of the test's own (the live servers use theirs)."""
    settings.MEDIA_ROOT = str(tmp_path / "media")
    return settings.MEDIA_ROOT
