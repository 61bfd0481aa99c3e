"""Extra CLI commands: each module here defines ``command`` (a click command or group)."""
