"""unicorn's Python binding, imported after the library is chosen (library.py).

Every module of this backend takes unicorn from here: the binding loads its library when it is
first imported, so importing it anywhere else first could load the wrong one. A VM made through
``EmulateHypervisor`` has chosen already (with the command's own reporting); anything else that
imports this (a test, a bench script) chooses here, reporting on stderr.
"""

from __future__ import annotations

import importlib
from typing import Any

from vmmarch_cli.backends.emulate import library

library.load()

from unicorn import unicorn_const as uc_const  # noqa: E402  (after the choice above)
from unicorn import x86_const as x86  # noqa: E402

_binding: Any = importlib.import_module("unicorn")
#: The binding's classes, untyped for mypy (its stubs leave most methods unannotated).
Uc: Any = _binding.Uc
UcError: type[Exception] = _binding.UcError

__all__ = ["Uc", "UcError", "uc_const", "x86"]
