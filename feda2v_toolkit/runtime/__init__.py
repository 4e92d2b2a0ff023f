"""The process a command runs in: atomic writes, memory limits, progress, threads, sizes, the allocator."""
