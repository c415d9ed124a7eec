"""Built-in methods; each module registers itself at the bottom with ``@register_method``."""

from accel.methods import (  # noqa: F401
    adaspa,
    bac,
    delta_dit,
    hierarchical_prune,
    quest,
    vmoba,
)
