"""Analysis of trained networks: certificates of invertibility and exact singular values of convolutions."""

from invertnet.analysis.certificates import BlockCertificate as BlockCertificate
from invertnet.analysis.certificates import Certificate as Certificate
from invertnet.analysis.certificates import LayerNorm as LayerNorm
from invertnet.analysis.certificates import certify as certify
from invertnet.analysis.certificates import plot_certificate as plot_certificate
from invertnet.analysis.spectral import ConvNormBounds as ConvNormBounds
from invertnet.analysis.spectral import conv_norm_bounds as conv_norm_bounds
from invertnet.analysis.spectral import conv_singular_values as conv_singular_values

__all__ = [
    "BlockCertificate",
    "Certificate",
    "ConvNormBounds",
    "LayerNorm",
    "certify",
    "conv_norm_bounds",
    "conv_singular_values",
    "plot_certificate",
]
