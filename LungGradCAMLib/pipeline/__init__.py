"""End to end: CT -> lung mask -> model preprocessing -> CAM -> Explanation -> outputs."""
from .explainer import *  # noqa: F401,F403 - interim, while the module is split
from .explainer import _argument_type, _device  # noqa: F401
