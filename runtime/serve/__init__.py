"""Serve wing: HTTP routes, the Workers AI wire format, SSE, admission and metrics over one engine."""
