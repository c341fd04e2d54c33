"""The environment a cache is valid for: fingerprint, CPU target, torch's layout, code identity."""
