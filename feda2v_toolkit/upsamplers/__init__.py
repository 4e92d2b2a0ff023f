"""Built-in sequence upsamplers, one module each."""
