"""Fixtures that start real object-store servers on 127.0.0.1 (filled in by the S3/GCS work)."""
