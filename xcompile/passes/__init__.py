"""Compiler passes, one module each, registered by name with `@register_pass`."""
