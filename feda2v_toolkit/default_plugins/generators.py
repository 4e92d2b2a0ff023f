"""Built-in generators plugin module (filled in by its issue)."""
