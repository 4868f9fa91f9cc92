"""The board vmm-arch presents to a guest: where its legacy devices sit and which ISA IRQs they
raise. The machine wires its devices from here, and the ACPI tables describe the same list, so a
port the guest is told about is a port that answers, and the other way round.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SerialPort:
    name: str  # the ACPI device name: "COM1"
    base: int  # the first of its I/O ports
    irq: int  # its ISA IRQ
    tty: str  # what Linux calls it: "/dev/ttyS0"


#: The PC's serial ports (Linux include/asm-generic/serial.h SERIAL_PORT_DFNS), in Linux's
#: ttyS order. COM1 carries the console; ``vmm-arch run`` puts a command's stdout and stderr on
#: COM2 and COM3. COM3 shares IRQ 4 with COM1, COM4 IRQ 3 with COM2.
SERIAL_PORTS = (
    SerialPort("COM1", 0x3F8, 4, "/dev/ttyS0"),
    SerialPort("COM2", 0x2F8, 3, "/dev/ttyS1"),
    SerialPort("COM3", 0x3E8, 4, "/dev/ttyS2"),
    SerialPort("COM4", 0x2E8, 3, "/dev/ttyS3"),
)
CONSOLE = SERIAL_PORTS[0]
#: An 8250/16550 UART decodes 8 consecutive ports (RBR/THR ... SCR).
SERIAL_PORT_COUNT = 8

#: The exit port: a write ends the run with the value as its status (devices/exit_port.py).
#: 0xF4 is where QEMU users conventionally put isa-debug-exit, so the same guest ends a QEMU run.
EXIT_PORT = 0xF4

#: The PC's POST diagnostic port (the BIOS writes its progress codes there). No device of this
#: board decodes it, so a guest's write to it is a port exit that changes nothing: what the
#: test guests use when they only want an exit.
POST_PORT = 0x80
#: The i8042 keyboard controller: data at 0x60, status and command at 0x64 (IBM PC/AT technical
#: reference); one range covers both. Linux's ``reboot=k`` resets through it.
I8042_BASE = 0x60
I8042_PORT_COUNT = 5
#: The MC146818 RTC and CMOS: index at 0x70, data at 0x71.
RTC_BASE = 0x70
RTC_PORT_COUNT = 2

#: ``vmm-arch run`` from a snapshot (runjob.py): the UART through which a restored guest
#: receives its job.
RUN_JOB_PORT = SERIAL_PORTS[3]

#: The I/O APIC's inputs: 24, as KVM's in-kernel IOAPIC and the 82093AA have.
IOAPIC_PINS = 24


def ioapic_id(cpus: int) -> int:
    """The I/O APIC's ID: the first after the CPUs' local APIC IDs 0..cpus-1 (MP spec 1.4, 3.6.8:
    IDs are unique across local and I/O APICs). The MP table, the MADT and the emulated I/O
    APIC's ID register all say this one."""
    return cpus


#: The ISA IRQs the board's devices raise, for the MADT's interrupt source overrides.
ISA_IRQS_USED = tuple(sorted({p.irq for p in SERIAL_PORTS}))
