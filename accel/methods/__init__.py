"""Built-in methods; each module registers itself at the bottom with ``@register_method``."""

from accel.methods import delta_dit  # noqa: F401,E402
from accel.methods import bac  # noqa: F401,E402
from accel.methods import hierarchical_prune  # noqa: F401,E402
from accel.methods import adaspa, vmoba  # noqa: F401,E402
from accel.methods import quest  # noqa: F401,E402
