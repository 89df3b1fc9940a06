#!/usr/bin/env python3
"""notes-app: the small web application the DR drill demo backs up, restores and probes.

Standard-library Python only, so any host with python3 runs it (nothing to install): its state is
one SQLite database, `notes.sqlite3` in its data directory, which is what a backup copies and a
drill restores. Run it on a restored copy inside a network namespace with `--bind 127.0.0.1`.

    python3 app.py --data DIR [--port 8080] [--bind 127.0.0.1]

    GET  /health   200 `ok notes=N` (N: the row count, so a probe can compare it with the point)
    GET  /notes    200, the notes as JSON, oldest first
    POST /notes    {"text": "..."} → 201 and the stored note as JSON

It refuses to start on a directory without its database (seed.py creates one): a copy whose
restore went wrong must fail its probes, not come up empty and answer `ok notes=0`. SQL probes
read the same file, e.g. `SELECT count(*) FROM notes`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType

DATABASE = "notes.sqlite3"
SCHEMA = "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL, created TEXT NOT NULL)"
MAX_BODY = 64 * 1024
MAX_TEXT = 4096


def database_path(data: Path) -> Path:
    return data / DATABASE


def connect(data: Path) -> sqlite3.Connection:
    # One connection per request: sqlite3 connections are not shared across the server's threads.
    connection = sqlite3.connect(database_path(data), timeout=10)
    connection.execute("PRAGMA synchronous=FULL")  # a note answered 201 survives a power cut
    return connection


def create(data: Path) -> None:
    """Create the data directory and an empty database (what seed.py starts from)."""
    data.mkdir(parents=True, exist_ok=True)
    with connect(data) as connection:
        connection.execute(SCHEMA)
    connection.close()


def add_note(data: Path, text: str) -> dict[str, object]:
    connection = connect(data)
    try:
        with connection:
            # lastrowid rather than RETURNING: hosts with SQLite older than 3.35 run this too.
            cursor = connection.execute(
                "INSERT INTO notes (text, created) VALUES (?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))", (text,))
            created = connection.execute("SELECT created FROM notes WHERE id = ?", (cursor.lastrowid,)).fetchone()[0]
        return {"id": cursor.lastrowid, "text": text, "created": created}
    finally:
        connection.close()


def list_notes(data: Path) -> list[dict[str, object]]:
    connection = connect(data)
    try:
        rows = connection.execute("SELECT id, text, created FROM notes ORDER BY id").fetchall()
    finally:
        connection.close()
    return [{"id": note_id, "text": text, "created": created} for note_id, text, created in rows]


def count_notes(data: Path) -> int:
    connection = connect(data)
    try:
        return int(connection.execute("SELECT count(*) FROM notes").fetchone()[0])
    finally:
        connection.close()


class NotesHandler(BaseHTTPRequestHandler):
    server_version = "notes-app/1"
    data: Path  # set on the subclass made for one server

    def handle_one_request(self) -> None:
        # A database gone or damaged under a running copy answers 503, which a probe reads as
        # failed, rather than a dropped connection and a traceback.
        try:
            super().handle_one_request()
        except sqlite3.Error as exc:
            self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"database: {exc}"})

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        if self.path == "/health":
            self._send(HTTPStatus.OK, f"ok notes={count_notes(self.data)}\n".encode(), "text/plain; charset=utf-8")
        elif self.path == "/notes":
            self._json(HTTPStatus.OK, list_notes(self.data))
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/notes":
            self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {MAX_BODY} bytes"})
            return
        try:
            body = json.loads(self.rfile.read(length) or b"null")
            text = body["text"]
            if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            self._json(HTTPStatus.BAD_REQUEST, {"error": f'expected {{"text": "..."}}, 1 to {MAX_TEXT} characters'})
            return
        self._json(HTTPStatus.CREATED, add_note(self.data, text))

    def _json(self, status: HTTPStatus, body: object) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def serve(data: Path, bind: str, port: int) -> None:
    handler = type("Handler", (NotesHandler,), {"data": data})
    server = ThreadingHTTPServer((bind, port), handler)

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever to return, so it must not run on the serving thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, bound_port = server.server_address[:2]
    # The one line a supervisor waits for; with --port 0 it is how the port chosen is learnt.
    print(f"listening on http://{host}:{bound_port} notes={count_notes(data)}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A small notes web application kept in SQLite.")
    parser.add_argument("--data", type=Path, required=True, help=f"data directory holding {DATABASE}")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (0: any free one; printed at start)")
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    args = parser.parse_args(argv)
    if not database_path(args.data).is_file():
        print(f"notes-app: {database_path(args.data)}: no database (create one with seed.py)", file=sys.stderr)
        return 1
    try:
        serve(args.data, args.bind, args.port)
    except OSError as exc:
        print(f"notes-app: cannot listen on {args.bind}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except sqlite3.DatabaseError as exc:
        print(f"notes-app: {database_path(args.data)}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
