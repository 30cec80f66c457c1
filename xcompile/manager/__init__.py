"""The pass manager: settings, plan checking, the run loop, the cache, manifests, reproducers.

It knows passes only through the registry (`xcompile.passes.base`): their formats, versions and
configs. `xcompile.build` drives it; `xcompile.report` renders what it returns.
"""
