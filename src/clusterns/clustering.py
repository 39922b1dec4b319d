"""The modified K-means, under the name the method's public API has always had (it lives in
:mod:`clusterns.method.clustering`)."""

from clusterns.method.clustering import *  # noqa: F401,F403
from clusterns.method.clustering import __all__  # noqa: F401
