"""Tables, queries and migrations, on SQLite or PostgreSQL."""
