"""Fixtures for the hermetic Hub round trip: push with the real huggingface_hub client, read back through olah.

- ``hub_stack`` (session): the test upload server of ``tests/hub_server.py`` and an ``olah`` mirror in offline mode
  (``mirrors-path`` = the same folder of git repositories), each on a free 127.0.0.1 port. A missing or broken
  olah fails the test loudly; it never skips.
- ``hub_env`` (function): the client side environment: Xet off, a fresh ``HF_HOME``, Hub offline mode off (the
  suite's conftest turns it on), no ambient token, and ``huggingface_hub.constants`` patched to match, since
  huggingface_hub reads those variables once, at import time.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from hub_server import HubUploadServer

HUB_TOKEN = "test-token"
DEAD_ENDPOINT = "http://127.0.0.1:9"  # discard port: anything not pointed at our servers fails fast, locally
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class HubStack:
    upload: HubUploadServer
    upload_url: str
    olah_url: str
    mirrors: Path
    token: str = HUB_TOKEN


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(url: str, *, timeout: float = 60.0, proc: subprocess.Popen | None = None,
                       log: Path | None = None) -> None:
    """Poll ``url`` until any HTTP answer (even an error status) comes back; fail loudly otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            pytest.fail(f"olah exited with code {proc.returncode} before answering on {url}:\n{tail}")
        try:
            with _NO_PROXY.open(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            pytest.fail(f"{url} did not answer within {timeout:.0f}s:\n{tail}")
        time.sleep(0.1)


def _olah_config(path: Path, *, port: int, mirrors: Path, cache: Path) -> None:
    q = json.dumps  # a JSON string is a valid TOML basic string
    path.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f"repos-path = {q(str(cache))}\nmirrors-path = [{q(str(mirrors))}]\n"
        f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n'
        # never contacted in offline mode; a dead local port anyway, so a regression cannot reach the internet
        'hf-scheme = "http"\nhf-netloc = "127.0.0.1:9"\nhf-lfs-netloc = "127.0.0.1:9"\n'
        "\n[accessibility]\noffline = true\n"
    )


@pytest.fixture(scope="session")
def hub_stack():
    if importlib.util.find_spec("olah") is None:
        pytest.fail("olah is not installed: `pip install olah==0.5.4` (the Hub round-trip test needs it)")
    if shutil.which("git") is None:
        pytest.fail("git is not on PATH: the test Hub server commits uploads into git repositories")
    root = Path(tempfile.mkdtemp(prefix="hub-stack-"))
    mirrors = root / "mirrors"
    mirrors.mkdir()
    port, log = free_port(), root / "olah.out"
    _olah_config(root / "olah.toml", port=port, mirrors=mirrors, cache=root / "olah-cache")
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with HubUploadServer(mirrors, token=HUB_TOKEN) as upload, open(log, "wb") as out:
        wait_until_answers(f"{upload.url}/api/models/none/none", timeout=10)
        proc = subprocess.Popen(
            [sys.executable, "-c", "from olah.server import cli; cli()",
             "--config", str(root / "olah.toml"), "--log-path", str(root / "olah-logs")],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            olah_url = f"http://127.0.0.1:{port}"
            # (olah's "/" page raises with this starlette; an unknown repo answers a clean 401 RepoNotFound)
            wait_until_answers(f"{olah_url}/api/models/none/none/revision/main", proc=proc, log=log)
            yield HubStack(upload=upload, upload_url=upload.url, olah_url=olah_url, mirrors=mirrors)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Client-side Hub settings for one test; returns the fresh HF_HOME."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    home.mkdir()
    for k, v in {"HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
                 "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost",
                 "no_proxy": "127.0.0.1,localhost"}.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_CACHE", "HF_XET_CACHE"):
        monkeypatch.delenv(k, raising=False)
    # huggingface_hub froze these at import (before this fixture ran): patch the module constants too.
    for name, value in {"HF_HUB_DISABLE_XET": True, "HF_HUB_OFFLINE": False, "HF_HOME": str(home),
                        "HF_HUB_CACHE": str(home / "hub"), "HF_ASSETS_CACHE": str(home / "assets"),
                        "HF_XET_CACHE": str(home / "xet"), "HF_TOKEN_PATH": str(home / "token"),
                        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"), "ENDPOINT": DEAD_ENDPOINT,
                        # hf_hub_url() builds from this template, then swaps a leading ENDPOINT for the explicit
                        # endpoint: the two must agree, or explicit endpoints are silently ignored.
                        "HUGGINGFACE_CO_URL_TEMPLATE": DEAD_ENDPOINT + "/{repo_id}/resolve/{revision}/{filename}",
                        }.items():
        monkeypatch.setattr(constants, name, value)
    return home
