"""Shared fixtures: each real test host lives in its own module under tests/hosts/."""

pytest_plugins = ["tests.hosts.sshd", "tests.hosts.winrm", "tests.hosts.azurite"]
