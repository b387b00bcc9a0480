"""Concrete stores: SQL metadata (SQLAlchemy) and artifact bytes (local directory, MinIO/S3)."""
