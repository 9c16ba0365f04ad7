"""The ASGI edge: routes, request ids, error responses and the access log."""
