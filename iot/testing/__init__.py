"""Test and benchmark harness: real server processes against real Postgres and Redis."""
