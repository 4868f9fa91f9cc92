"""A gdb remote stub for the boot commands (docs/gdb.md)."""
