"""The node side: resolve, fetch, verify, install, then tell the app it may start."""
