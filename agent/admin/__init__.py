"""Operator commands over a store: `torchwarm ls` and `torchwarm gc`."""
