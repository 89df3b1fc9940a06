#!/usr/bin/env python3
"""Probe checks run on a Linux host itself (fed to `python3 -`, nothing left behind).

    probe_host.py tcp ADDRESS PORT TIMEOUT
    probe_host.py http URL TIMEOUT VERIFY(1|0) [CA_BUNDLE]
    probe_host.py sha256 PATHS_JSON          (a JSON list of paths)

Prints one JSON object on stdout; judging it (expected status, body) is the controller's work,
so a check reads the same wherever it ran. Standard library only: python3 is all a target has.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import sys
import urllib.error
import urllib.request

#: What comes back of a body: enough for a health page, bounded for a large download.
BODY_LIMIT = 64 * 1024


def tcp(address: str, port: str, timeout: str) -> dict[str, object]:
    try:
        with socket.create_connection((address, int(port)), timeout=float(timeout)):
            return {"ok": True}
    except OSError as exc:
        return {"ok": False, "error": exc.strerror or type(exc).__name__}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # The probe judges the answer it gets, as the controller's httpx does (no redirects followed).
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def http(url: str, timeout: str, verify: str, ca_bundle: str = "") -> dict[str, object]:
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if url.lower().startswith("https:"):
        # Only for HTTPS: loading the trust store costs milliseconds a plain-HTTP probe need not pay.
        context = ssl.create_default_context(cafile=ca_bundle or None)
        if verify != "1":
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=float(timeout)) as response:
            return {"status": response.status, "body": response.read(BODY_LIMIT).decode("utf-8", "replace")}
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read(BODY_LIMIT).decode("utf-8", "replace")}
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return {"error": f"{type(reason).__name__}: {reason}"}


def sha256(paths_json: str) -> dict[str, object]:
    digests: dict[str, str | None] = {}
    for path in json.loads(paths_json):
        try:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            digests[path] = digest.hexdigest()
        except OSError:
            digests[path] = None
    return {"digests": digests}


CHECKS = {"tcp": tcp, "http": http, "sha256": sha256}

if __name__ == "__main__":
    print(json.dumps(CHECKS[sys.argv[1]](*sys.argv[2:])))
