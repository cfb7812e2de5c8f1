"""Serve wing, cluster part: the same app on many Ray Serve replicas (ray is imported only in this package)."""
