"""Router adapters: patch the routers of existing MoE models, reversibly."""

from .api import UnsupportedModelError, find_routers, patch, patch_state_of, run_selftest, unpatch
from .registry import register_router, supported_architectures, unsupported_architectures
from .versions import UnverifiedRouterError

__all__ = ["patch", "unpatch", "find_routers", "patch_state_of", "run_selftest", "register_router",
           "supported_architectures", "unsupported_architectures", "UnsupportedModelError",
           "UnverifiedRouterError"]
