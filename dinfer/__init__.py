"""The `dinfer` command line: the one place that knows both the daemon and the provider node."""
