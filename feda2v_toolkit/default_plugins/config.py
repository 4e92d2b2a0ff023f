"""Built-in config plugin module (filled in by its issue)."""
