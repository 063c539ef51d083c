"""Plain-Python SplitMix64 uniforms: the independent reference of the view draws."""

_M64 = (1 << 64) - 1


def splitmix(x):
    """SplitMix64's step on a Python int: an independent reference of the sampler's."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def reference_uniform(seed, epoch, donor, slot):
    """Uniform number ``slot`` of ``donor`` in ``epoch``, as the sampler draws it."""
    state = splitmix(seed)
    for word in (epoch, donor, slot):
        state = splitmix(state ^ word)
    return (state >> 11) / 2**53
