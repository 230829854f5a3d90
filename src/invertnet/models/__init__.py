"""Models: flows as distributions (i-ResNet, MintNet, and the RealNVP and Glow baselines), invertible classifiers,
generative networks and a conditional GAN, and the mass-spectra classifiers IsotopeNet and ResidualNet (thesis
ch. 7)."""

from invertnet.models.classifiers import FullyInvertibleClassifier as FullyInvertibleClassifier
from invertnet.models.classifiers import InvertibleClassifier as InvertibleClassifier
from invertnet.models.classifiers import fully_invertible_classifier as fully_invertible_classifier
from invertnet.models.classifiers import iresnet_classifier as iresnet_classifier
from invertnet.models.classifiers import mintnet_classifier as mintnet_classifier
from invertnet.models.coupling_flows import glow_flow as glow_flow
from invertnet.models.coupling_flows import realnvp_flow as realnvp_flow
from invertnet.models.coupling_flows import spline_flow as spline_flow
from invertnet.models.evaluation import LogProbEvaluation as LogProbEvaluation
from invertnet.models.evaluation import evaluate_log_prob as evaluate_log_prob
from invertnet.models.flows import FlowDistribution as FlowDistribution
from invertnet.models.flows import standard_normal as standard_normal
from invertnet.models.gan import ConditionalGAN as ConditionalGAN
from invertnet.models.gan import conditional_dcgan as conditional_dcgan
from invertnet.models.generators import DCGANDiscriminator as DCGANDiscriminator
from invertnet.models.generators import DCGANGenerator as DCGANGenerator
from invertnet.models.generators import GeneratorConditions as GeneratorConditions
from invertnet.models.generators import TransposedConvGenerator as TransposedConvGenerator
from invertnet.models.generators import load_generator as load_generator
from invertnet.models.generators import save_generator as save_generator
from invertnet.models.iresnet_flows import dense_iresnet_flow as dense_iresnet_flow
from invertnet.models.iresnet_flows import multiscale_iresnet_flow as multiscale_iresnet_flow
from invertnet.models.mintnet_flows import mintnet_flow as mintnet_flow
from invertnet.models.roc_lda import RocLda as RocLda
from invertnet.models.roc_lda import roc_statistics as roc_statistics
from invertnet.models.saving import load as load
from invertnet.models.saving import save as save
from invertnet.models.sizes import parameter_count as parameter_count
from invertnet.models.sizes import without_allocation as without_allocation
from invertnet.models.spectra import IsotopeNet as IsotopeNet
from invertnet.models.spectra import ResidualNet as ResidualNet

__all__ = [
    "ConditionalGAN",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "FlowDistribution",
    "FullyInvertibleClassifier",
    "GeneratorConditions",
    "InvertibleClassifier",
    "IsotopeNet",
    "LogProbEvaluation",
    "ResidualNet",
    "RocLda",
    "TransposedConvGenerator",
    "conditional_dcgan",
    "dense_iresnet_flow",
    "evaluate_log_prob",
    "fully_invertible_classifier",
    "glow_flow",
    "iresnet_classifier",
    "load",
    "load_generator",
    "mintnet_classifier",
    "mintnet_flow",
    "multiscale_iresnet_flow",
    "parameter_count",
    "realnvp_flow",
    "spline_flow",
    "roc_statistics",
    "save",
    "save_generator",
    "standard_normal",
    "without_allocation",
]
