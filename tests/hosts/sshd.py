"""Test host fixtures (sshd)."""
