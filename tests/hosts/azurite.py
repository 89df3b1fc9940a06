"""Test host fixtures (azurite)."""
