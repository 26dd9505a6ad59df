"""The verified-download path against a real HTTP server on 127.0.0.1: match, mismatch, 404."""

from __future__ import annotations

import functools
import threading
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alpaca_nb.data import ASSETS, DataError, download, load_prompt_template, resolve


@pytest.fixture
def http_root(tmp_path):
    """Serve a folder over HTTP on 127.0.0.1; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_with_matching_hash_lands_in_the_cache(upstream_dir, isolated_cache, http_root, monkeypatch):
    root, base = http_root
    (root / "prompt.txt").write_bytes((upstream_dir / "prompt.txt").read_bytes())
    monkeypatch.setitem(ASSETS, "prompt", replace(ASSETS["prompt"], url=f"{base}/prompt.txt"))
    assert load_prompt_template().endswith("List of 20 tasks:")
    assert (isolated_cache / "prompt.txt").read_bytes() == (upstream_dir / "prompt.txt").read_bytes()
    # The second call finds the cached copy: the server can disappear.
    (root / "prompt.txt").unlink()
    assert resolve("prompt") == isolated_cache / "prompt.txt"


def test_download_with_wrong_hash_is_deleted_and_raises(isolated_cache, http_root):
    root, base = http_root
    (root / "prompt.txt").write_text("not the upstream prompt")
    with pytest.raises(DataError, match="sha256 does not match the pinned prompt"):
        download(ASSETS["prompt"], isolated_cache, url=f"{base}/prompt.txt")
    assert list(isolated_cache.iterdir()) == []  # neither the file nor a partial copy is left


def test_download_404_names_the_url_and_status(isolated_cache, http_root):
    _, base = http_root
    with pytest.raises(DataError, match=r"GET http://127\.0\.0\.1:\d+/missing\.txt answered HTTP 404"):
        download(ASSETS["prompt"], isolated_cache, url=f"{base}/missing.txt")
    assert list(isolated_cache.iterdir()) == []


def test_failed_download_through_resolve_says_where_it_looked(isolated_cache, http_root, monkeypatch):
    _, base = http_root
    monkeypatch.setitem(ASSETS, "prompt", replace(ASSETS["prompt"], url=f"{base}/gone.txt"))
    with pytest.raises(DataError) as caught:
        resolve("prompt")
    message = str(caught.value)
    assert "prompt.txt (prompt) not found" in message and str(isolated_cache) in message
    assert "HTTP 404" in message and "ALPACA_NB_DATA_DIR" in message


def test_connection_refused_becomes_a_data_error(isolated_cache):
    with pytest.raises(DataError, match="ConnectError"):
        download(ASSETS["prompt"], isolated_cache, url="http://127.0.0.1:9/prompt.txt", timeout=5)
