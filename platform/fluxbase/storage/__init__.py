"""Object storage: the S3 client wrapper (and, later, buckets and files)."""
