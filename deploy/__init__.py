"""mlfe deployment: configuration, the replica inference server, targets and the CLI."""
