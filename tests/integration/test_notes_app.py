"""The demo application for real: seeded, started, written to and read over HTTP, stopped, and
started again on a copy of its data directory; and inside a network namespace, where it answers
on its own loopback and nothing outside can reach it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.hosts.notes_app import APP, network_namespace, running, seed

pytestmark = pytest.mark.integration


def test_write_read_stop_and_the_same_rows_on_a_copy_of_the_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert seed(data, 3) == "notes=3"
    with running(data) as app:
        assert app.banner.endswith("notes=3")
        health = httpx.get(f"{app.url}/health")
        assert (health.status_code, health.text) == (200, "ok notes=3\n")
        hostile = "<script>alert(1)</script> ' OR 1=1; -- ünï"
        created = httpx.post(f"{app.url}/notes", json={"text": hostile})
        assert created.status_code == 201 and created.json()["text"] == hostile
        notes = httpx.get(f"{app.url}/notes").json()
        assert [n["text"] for n in notes] == ["note 1", "note 2", "note 3", hostile]
        assert httpx.get(f"{app.url}/health").text == "ok notes=4\n"
        app.process.send_signal(signal.SIGTERM)
        assert app.process.wait(timeout=15) == 0

    copy = tmp_path / "restored"
    shutil.copytree(data, copy)
    with running(copy) as restored:
        assert httpx.get(f"{restored.url}/notes").json() == notes
        assert httpx.get(f"{restored.url}/health").text == "ok notes=4\n"


def test_bad_requests_are_answered_and_store_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    seed(data, 1)
    with running(data) as app:
        for body in (b"not json", b'{"text": ""}', b'{"text": 5}', b'{"note": "x"}', b"[]"):
            answer = httpx.post(f"{app.url}/notes", content=body, headers={"Content-Type": "application/json"})
            assert answer.status_code == 400, body
        assert httpx.post(f"{app.url}/notes", content=b"x" * (64 * 1024 + 1)).status_code == 413
        assert httpx.get(f"{app.url}/nowhere").status_code == 404
        assert httpx.get(f"{app.url}/health").text == "ok notes=1\n"


def test_a_data_directory_without_its_database_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    done = subprocess.run([sys.executable, str(APP), "--data", str(tmp_path / "empty"), "--port", "0"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"notes-app: {tmp_path / 'empty' / 'notes.sqlite3'}: no database (create one with seed.py)\n"


def test_a_port_in_use_is_refused_in_one_line(tmp_path: Path) -> None:
    seed(tmp_path / "data", 1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, str(APP), "--data", str(tmp_path / "data"), "--port", str(port)],
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr.startswith(f"notes-app: cannot listen on 127.0.0.1:{port}: ") and done.stderr.count("\n") == 1


def _get_inside(namespace: str, url: str) -> str:
    """GET url from inside the namespace, as a drill's probes run there."""
    return subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c",
         f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())"],
        capture_output=True, text=True, timeout=30, check=True).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_inside_a_network_namespace_it_answers_there_and_is_unreachable_from_outside(tmp_path: Path) -> None:
    data = tmp_path / "data"
    seed(data, 2)
    # Hold a port in this namespace without listening on it: a connect to it here is then refused
    # for certain, whatever else runs on the machine; the app takes the same number inside.
    with socket.socket() as reserved, network_namespace() as namespace:
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        with running(data, port=port, prefix=["ip", "netns", "exec", namespace]) as app:
            assert _get_inside(namespace, f"{app.url}/health").strip() == "ok notes=2"
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{app.url}/health", timeout=5)
            notes = json.loads(_get_inside(namespace, f"{app.url}/notes"))
            assert [n["text"] for n in notes] == ["note 1", "note 2"]
