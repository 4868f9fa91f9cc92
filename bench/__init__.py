"""vmm-arch benchmarks side by side with QEMU: ``python -m bench`` (see docs/benchmarks.md)."""
