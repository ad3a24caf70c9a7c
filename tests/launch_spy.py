"""Stand-ins for a Triton kernel in a module (monkeypatched in its place): one that counts the
launches and passes them on, one that refuses any launch (a path that must not run)."""


class CountLaunches:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


class RefuseLaunches:
    def __init__(self, why: str):
        self.why = why

    def __getitem__(self, grid):
        raise AssertionError(self.why)
