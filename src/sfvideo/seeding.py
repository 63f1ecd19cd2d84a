"""Seeds derived from integers, identical in every process (Python's ``hash`` is salted per process)."""


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (FNV-1a over 64-bit words).

    Training code derives every generator from ``(seed, purpose, step[, rank, micro-batch])``: decisions all ranks
    must share leave the rank out, noise puts it in, and a resumed run re-derives exactly the same streams.
    """
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h
