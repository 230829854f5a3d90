"""Models built from invertible layers: flows as distributions."""

from invertnet.models.flows import FlowDistribution as FlowDistribution
from invertnet.models.flows import standard_normal as standard_normal

__all__ = ["FlowDistribution", "standard_normal"]
