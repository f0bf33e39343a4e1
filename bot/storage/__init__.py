"""Chat history storage: SQLAlchemy 2 (async) models, the store API, and Alembic migrations."""
