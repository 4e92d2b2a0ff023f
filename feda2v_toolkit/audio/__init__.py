"""Audio in: audio sources and clip reading (soundfile, soxr), and AST embeddings (transformers)."""
