"""Built-in generator types, one module each: ``vae`` (the original FedA2V VAE) and ``gan``."""
