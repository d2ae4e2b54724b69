"""The garbage collector and a serving process's long-lived objects.

A full collection walks every object the collector tracks. With vLLM, torch and transformers
imported, that is over half a million objects: about 300 ms a pass, during which the process's
event loop (and every stream it serves) stands still. Under load a full collection comes every few
seconds: that was the fleet's ITL p99 of ~450 ms at 1000 streams. Freezing the heap once it holds
what lives as long as the process (modules, a loaded model) moves those objects out of the
collector's sight; a collection then walks only what serving allocates. vLLM's own API server and
engine core do the same after start-up.
"""

from __future__ import annotations

import gc


def freeze() -> None:
    """Everything alive now is long-lived: collect what is not, then freeze the rest."""
    gc.collect()
    gc.freeze()


def refreeze() -> None:
    """After long-lived objects went away (an unloaded model): give them back to the collector, so
    that they can be freed, then freeze what is still alive."""
    gc.unfreeze()
    freeze()
