"""A throwaway local account with a password, for tests of SSH password authentication.

sshd with `UsePAM no` checks passwords against /etc/shadow itself, so the account must be
real; it is created with useradd and removed at the end of the test session.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from dataclasses import dataclass

# useradd/userdel fail at once when another process holds /etc/passwd's lock.
LOCK_RETRIES = 20


@dataclass(frozen=True)
class LocalUser:
    name: str
    password: str


def _run_locked(command: list[str], stdin: str | None = None) -> None:
    for _ in range(LOCK_RETRIES):
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
        if done.returncode == 0:
            return
        if "lock" not in done.stderr.lower():
            break
        time.sleep(0.25)
    # The password goes in on stdin, never on the command line, so this message is safe.
    raise RuntimeError(f"{command[0]} {command[-1]} failed ({done.returncode}): {done.stderr.strip()}")


def create_user() -> LocalUser:
    """A new account with a random name and password (needs root)."""
    user = LocalUser(name=f"pdt{secrets.token_hex(4)}", password=secrets.token_urlsafe(18))
    _run_locked(["useradd", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/bin/sh", user.name])
    _run_locked(["chpasswd"], stdin=f"{user.name}:{user.password}\n")
    return user


def delete_user(user: LocalUser) -> None:
    _run_locked(["userdel", user.name])
