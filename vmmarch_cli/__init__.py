"""vmm-arch: boot x86_64 kernels through one hypervisor-neutral arch pipeline."""

__version__ = "0.1.0"
