"""Where runs keep what matters: checkpoints (a folder or S3) and run records (a database)."""
