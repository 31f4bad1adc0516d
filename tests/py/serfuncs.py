"""Task callables for the serialization tests, importable by workers."""


class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def __call__(self, x):
        return x * self.factor

    def apply(self, x):
        return x * self.factor


class Counter:
    """Counts its calls: a task that finds a count left by an earlier task got a reused copy."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.calls
