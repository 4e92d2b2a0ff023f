"""Built-in sequence reducers, one module each."""
