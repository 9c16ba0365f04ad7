"""Protocol logic with no I/O: SSE scanning, usage extraction, request shaping."""
