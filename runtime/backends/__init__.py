"""Backends wing: the inference backends behind one interface; each owns its KV cache."""
