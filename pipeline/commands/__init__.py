"""Layer 9, commands: the CLI and the commands that only orchestrate others (demo, bench, clean)."""
