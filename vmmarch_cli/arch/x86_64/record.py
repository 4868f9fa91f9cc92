"""Binary records declared once: a ctypes structure per record, packed, little-endian (the form
backends/kvm/abi.py already uses for linux/kvm.h). Writers build one by field name and take its
bytes; readers get one back from bytes and read the same names."""

from __future__ import annotations

import ctypes
from typing import Self


class Record(ctypes.LittleEndianStructure):
    _pack_ = 1

    @classmethod
    def sizeof(cls) -> int:
        return ctypes.sizeof(cls)

    @classmethod
    def read(cls, data: bytes | bytearray, offset: int = 0) -> Self:
        """The record at ``offset``; ValueError when ``data`` ends before it does."""
        if offset < 0 or offset + cls.sizeof() > len(data):
            raise ValueError(f"{cls.__name__} at offset {offset} runs past {len(data)} bytes")
        return cls.from_buffer_copy(data, offset)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(field[0] for field in cls._fields_)

    def pack(self) -> bytes:
        return bytes(self)
