"""Locret: trained retaining heads that keep a long prompt's KV cache within a fixed budget."""
