"""I/O to upstreams: the HTTP client session and the account kinds."""
