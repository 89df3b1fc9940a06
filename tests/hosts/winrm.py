"""Test host fixtures (winrm)."""
