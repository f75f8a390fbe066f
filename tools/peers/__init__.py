"""Peer servers for tools/bench.py: each is a standalone script, run as its own process."""
