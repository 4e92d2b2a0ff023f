"""Training: one pipeline of stages whose releases merge, for one process, many sites and many ranks."""
