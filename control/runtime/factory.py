"""Which runtime a service runs: the one place that knows the implementations, so the
contract (control/runtime/base.py) imports none of them."""
from __future__ import annotations

from control.runtime.base import Runtime


def get_runtime(settings, **kwargs) -> Runtime:
    """The runtime named by `settings.runtime` (`local` or `knative`), not yet started."""
    if settings.runtime == "knative":
        from control.runtime.knative import KnativeRuntime

        return KnativeRuntime(settings, **kwargs)
    from control.runtime.local import LocalRuntime

    return LocalRuntime(settings, **kwargs)
