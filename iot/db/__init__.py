"""Database plumbing shared by every app (the Postgres backend with outage fail-fast)."""
