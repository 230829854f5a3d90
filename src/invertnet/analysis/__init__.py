"""Analysis of networks: certificates of invertibility, exact singular values of convolutions, ReLU preimages,
inverse stability, invariance (metameric sampling, the nuisance probe; the adversarial spheres in
``analysis.spheres``), and whether trained weights look Gaussian."""

from invertnet.analysis.certificates import BlockCertificate as BlockCertificate
from invertnet.analysis.certificates import Certificate as Certificate
from invertnet.analysis.certificates import LayerNorm as LayerNorm
from invertnet.analysis.certificates import certify as certify
from invertnet.analysis.certificates import plot_certificate as plot_certificate
from invertnet.analysis.invariance import metameric_sample as metameric_sample
from invertnet.analysis.invariance import nuisance_probe as nuisance_probe
from invertnet.analysis.preimages import PreimageResult as PreimageResult
from invertnet.analysis.preimages import is_omnidirectional as is_omnidirectional
from invertnet.analysis.preimages import relu_mlp_preimages as relu_mlp_preimages
from invertnet.analysis.preimages import relu_preimage as relu_preimage
from invertnet.analysis.spectral import ConvNormBounds as ConvNormBounds
from invertnet.analysis.spectral import conv_norm_bounds as conv_norm_bounds
from invertnet.analysis.spectral import conv_singular_values as conv_singular_values
from invertnet.analysis.stability import LayerSpectrum as LayerSpectrum
from invertnet.analysis.stability import layer_spectra as layer_spectra
from invertnet.analysis.stability import lemma_3_5_bounds as lemma_3_5_bounds
from invertnet.analysis.stability import lemma_3_6_bound as lemma_3_6_bound
from invertnet.analysis.stability import plot_layer_spectra as plot_layer_spectra
from invertnet.analysis.weight_laws import WeightNormality as WeightNormality
from invertnet.analysis.weight_laws import plot_weight_histograms as plot_weight_histograms
from invertnet.analysis.weight_laws import weight_normality as weight_normality

__all__ = [
    "BlockCertificate",
    "Certificate",
    "ConvNormBounds",
    "LayerNorm",
    "LayerSpectrum",
    "PreimageResult",
    "WeightNormality",
    "certify",
    "conv_norm_bounds",
    "conv_singular_values",
    "is_omnidirectional",
    "layer_spectra",
    "lemma_3_5_bounds",
    "lemma_3_6_bound",
    "metameric_sample",
    "nuisance_probe",
    "plot_certificate",
    "plot_layer_spectra",
    "plot_weight_histograms",
    "relu_mlp_preimages",
    "relu_preimage",
    "weight_normality",
]
