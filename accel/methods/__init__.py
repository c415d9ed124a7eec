"""Built-in methods; each module registers itself at the bottom with ``@register_method``."""
