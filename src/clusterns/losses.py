"""InfoNCE and BML, under the name the method's public API has always had (they live in
:mod:`clusterns.method.losses`)."""

from clusterns.method.losses import *  # noqa: F401,F403
from clusterns.method.losses import __all__  # noqa: F401
