"""The SQLAlchemy metadata store: SQLite embedded, PostgreSQL for several replicas."""
