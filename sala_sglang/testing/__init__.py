"""Test and benchmark harness: launch a server, compare it with the reference."""
