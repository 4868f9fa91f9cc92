"""What becomes of a CPU exception the emulator raised: delivered, or a triple fault.

unicorn reports every exception to a hook (or as an error for #UD) but never uses the guest's
IDT and has no double or triple fault. This module decides, from the guest's IDT, what a CPU
would do, following Intel SDM vol. 3A 6.15 (Interrupt 8, table 6-5, "Conditions for
Generating a Double Fault"): an exception whose gate is beyond the IDT limit raises #GP (a gate
that is not present raises #NP) while being delivered; a contributory exception (or #PF) during
the delivery of a contributory exception or #PF is a #DF; a #DF that cannot be delivered is a
triple fault (shutdown). KVM reports that last case as KVM_EXIT_SHUTDOWN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

VECTOR_NAMES = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
    10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
    19: "#XM", 20: "#VE", 21: "#CP",
}
NMI = 2
DOUBLE_FAULT = 8
NOT_PRESENT = 11
GENERAL_PROTECTION = 13
PAGE_FAULT = 14
#: SDM table 6-4, "Interrupt and Exception Classes".
CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})


def vector_name(vector: int) -> str:
    return VECTOR_NAMES.get(vector, f"vector {vector}")


@dataclass(frozen=True)
class Outcome:
    """``delivered`` is the vector whose handler the CPU would run, None for a triple fault;
    ``trail`` is every exception raised on the way, for the message."""

    delivered: int | None
    trail: tuple[int, ...]


#: Why the gate of a vector cannot be used, or None; ``not_present`` picks #NP over #GP.
GateCheck = Callable[[int], "str | None"]


def escalate(vector: int, gate_problem: GateCheck, not_present: Callable[[str], bool]
             ) -> Outcome:
    problem = gate_problem(vector)
    if problem is None:
        return Outcome(vector, (vector,))
    if vector == DOUBLE_FAULT:
        return Outcome(None, (vector,))
    second = NOT_PRESENT if not_present(problem) else GENERAL_PROTECTION
    benign = vector not in CONTRIBUTORY and vector != PAGE_FAULT
    if benign and gate_problem(second) is None:
        # After a benign first exception the #GP/#NP is handled serially (table 6-5).
        return Outcome(second, (vector, second))
    if gate_problem(DOUBLE_FAULT) is None:
        return Outcome(DOUBLE_FAULT, (vector, second, DOUBLE_FAULT))
    return Outcome(None, (vector, second, DOUBLE_FAULT))
