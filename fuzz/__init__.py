"""Fuzz targets for every input parser, and ``python -m fuzz`` to run them with atheris."""
