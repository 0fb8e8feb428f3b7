"""moe-balance: load balancing for Mixture-of-Experts training in the trainers you already use.

The core (this package's top level) needs only torch:

>>> import moe_balance as mb
>>> bal = mb.Balancer(mb.BalanceConfig(bias_update="sign"), num_layers=2, num_experts=8, top_k=2)
"""

from .balancer import Balancer
from .config import AUX_LOSSES, BIAS_SCHEDULES, BIAS_UPDATES, BalanceConfig, resolve_config
from .losses import AUX_LOSS_FNS, RoutingBatch, aux_loss, z_loss
from . import export
from .patching import (UnsupportedModelError, UnverifiedRouterError, find_routers, patch, register_router,
                       supported_architectures, unpatch, unsupported_architectures)

__version__ = "0.1.0"

__all__ = ["Balancer", "BalanceConfig", "resolve_config", "AUX_LOSSES", "BIAS_UPDATES",
           "BIAS_SCHEDULES", "AUX_LOSS_FNS", "RoutingBatch", "aux_loss", "z_loss", "patch", "unpatch",
           "find_routers", "register_router", "supported_architectures", "unsupported_architectures",
           "UnsupportedModelError", "UnverifiedRouterError", "export", "__version__"]
