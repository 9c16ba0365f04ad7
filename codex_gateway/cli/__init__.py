"""The command line: serve, sandbox and the administration commands."""
