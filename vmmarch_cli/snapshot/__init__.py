"""Snapshots of a running guest: the file format (fileformat.py) and guest memory as a sparse,
copy-on-write image (image.py). docs/snapshots.md describes the format and its rules."""
