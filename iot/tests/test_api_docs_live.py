"""The API docs work without internet access: every file their pages load comes from the server itself."""

import re
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.staticfiles import finders

pytestmark = pytest.mark.live

ASSET_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


def test_the_live_server_runs_without_debug(platform):
    # Django serves static files only under DEBUG unless something else does: the pages
    # below must work the way a deployment runs.
    assert platform.env.get("DJANGO_DEBUG", "").lower() in ("", "0", "false", "off", "no")


@pytest.mark.parametrize(("page", "ui_files"), [("/api/docs", 4), ("/api/redoc", 1)])
def test_the_docs_pages_load_only_files_the_server_serves(anonymous, page, ui_files):
    response = anonymous.get(page)
    assert response.status_code == 200
    html = response.text
    # Nothing from a CDN or a font service: the page must render with no internet access.
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assets = ASSET_URL.findall(html)
    assert len(assets) == ui_files, assets
    for url in assets:
        assert url.startswith(f"{settings.STATIC_URL}drf_spectacular_sidecar/"), url
        asset = anonymous.get(url)
        assert asset.status_code == 200, (url, asset.status_code)
        shipped = finders.find(url.removeprefix(settings.STATIC_URL))
        assert asset.content == Path(shipped).read_bytes(), url  # the packaged file itself
        if url.endswith(".js"):
            assert "javascript" in asset.headers["content-type"], (url, asset.headers["content-type"])
    # The schema the page reads is served too, without credentials.
    assert '"/api/schema"' in html
    schema = anonymous.get("/api/schema", headers={"Accept": "application/json"})
    assert schema.status_code == 200 and schema.json()["paths"]
