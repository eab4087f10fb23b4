"""Where runs keep what matters: checkpoints (a folder or S3) and, later, run records."""
