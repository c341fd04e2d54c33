"""The bucket format: the key tree, manifests, signatures and archives (docs/format.md)."""
