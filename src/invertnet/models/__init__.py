"""Models built from invertible layers: flows as distributions, i-ResNet and MintNet flow architectures."""

from invertnet.models.flows import FlowDistribution as FlowDistribution
from invertnet.models.flows import standard_normal as standard_normal
from invertnet.models.iresnet_flows import dense_iresnet_flow as dense_iresnet_flow
from invertnet.models.iresnet_flows import multiscale_iresnet_flow as multiscale_iresnet_flow
from invertnet.models.mintnet_flows import mintnet_flow as mintnet_flow

__all__ = ["FlowDistribution", "dense_iresnet_flow", "mintnet_flow", "multiscale_iresnet_flow", "standard_normal"]
