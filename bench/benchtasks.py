"""Task functions shared by the benchmarks (importable, so every pool pickles them by name)."""


def noop(x):
    return x


def countdown(n):
    while n > 0:
        n -= 1
    return n


def first_byte(buf):
    return memoryview(buf)[0]
