"""CPU sets for pinning a tier's process (`pdserve up --prefill-cpus 0 --decode-cpus 1`): on one host,
separate cores stand in for the separate GPUs each tier would have in a real deployment."""

import os


def parse_cpus(text: str) -> frozenset[int]:
    """ "0", "0,2", "0-3" or "0-1,4" -> the set of core ids; raises ValueError on anything else."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"CPU list {text!r}: expected ids and ranges such as 0, 0-1 or 0,2")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"CPU list {text!r}: range {part} runs backwards")
        cpus.update(range(low, high + 1))
    available = os.sched_getaffinity(0)
    if not cpus <= available:
        raise ValueError(f"CPU list {text!r} names cores {sorted(cpus - available)} this process may not use "
                         f"(available: {sorted(available)})")
    return frozenset(cpus)


def pin_to(cpus: frozenset[int] | None):
    """A Popen preexec_fn that pins the child to cpus before it execs (None: no pinning)."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def cpus_arg(text: str) -> frozenset[int]:
    """argparse type for a CPU list, with parse_cpus' message on a bad one."""
    import argparse

    try:
        return parse_cpus(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
