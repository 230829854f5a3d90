"""The papers' settings as written: the configs that claim a paper's experiment use its optimiser, schedule,
augmentation and input normalisation (Behrmann et al. 2019, appendix C; Behrmann's thesis, appendix A)."""

import math

import pytest
import torch

from invertnet.app.config import load_config
from invertnet.app.datasets import standardized


def test_the_cifar10_classifier_config_is_appendix_c2_as_written():
    """ "200 epochs with momentum SGD and a weight decay of 5e-4 ... learning rate 0.1, decayed by a factor of
    0.2 after 60, 120 and 160 epochs ... shifts / random horizontal flips for CIFAR ... normalise by subtracting
    the mean and dividing by the standard deviation of the training set" (the momentum, unstated, is 0.9)."""
    config = load_config("iresnet_classifier_cifar10")
    train, data = config.train, config.data
    epoch = math.ceil(50_000 / train.batch_size)
    assert (train.optimizer, train.lr, train.momentum, train.nesterov) == ("sgd", 0.1, 0.9, False)
    assert train.weight_decay == 5e-4 and train.steps == 200 * epoch
    assert (train.schedule, train.gamma, train.milestones) == ("step", 0.2, [60 * epoch, 120 * epoch, 160 * epoch])
    assert (data.augment_shift, data.augment_flip, data.normalization) == (2, True, "standardized")


def test_standardisation_uses_the_training_sets_statistics_per_channel():
    torch.manual_seed(0)
    train = torch.randn(200, 3, 4, 4) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + 2.0
    test = torch.randn(50, 3, 4, 4)
    train_standard, test_standard = standardized(train, test)
    assert torch.allclose(train_standard.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(train_standard.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5)
    mean, std = train.mean(dim=(0, 2, 3), keepdim=True), train.std(dim=(0, 2, 3), keepdim=True)
    assert torch.allclose(test_standard, (test - mean) / std)
    constant, _ = standardized(torch.ones(5, 1, 2, 2), torch.ones(1, 1, 2, 2))
    assert torch.equal(constant, torch.zeros(5, 1, 2, 2))


@pytest.mark.integration
def test_a_classifier_trains_with_the_papers_recipe(tmp_path):
    from invertnet.app.runs import train_run

    overrides = [
        "data.augment_shift=1",
        "data.augment_flip=true",
        "data.normalization=standardized",
        "model.n_blocks=1",
        "model.hidden_channels=16",
        "train.optimizer=sgd",
        "train.momentum=0.9",
        "train.lr=0.1",
        "train.weight_decay=5e-4",
        "train.steps=200",
        "train.checkpoint_every=200",
    ]
    summary = train_run(load_config("iresnet_classifier_digits", overrides), tmp_path / "run", progress=False)
    assert summary["test"]["accuracy"] > 0.5, summary["test"]


def _config_model_size(name: str, shape: tuple[int, ...]) -> int:
    """Free parameters of a config's model, built without allocating it (the CIFAR-10 models are large)."""
    from invertnet.models import parameter_count

    model = load_config(name).model
    return parameter_count(lambda: model.builder(shape, levels=256, **model.builder_arguments()))


def test_mintnet_sizes_are_those_of_the_text():
    """Song, Meng & Ermon 2019, 5.2: "Our MinvNet on MNIST has comparable number of parameters to i-ResNet, and our
    MinvNet on CIFAR-10 only uses 1/4 parameters of i-ResNet" (the i-ResNets of Behrmann's thesis, A.2)."""
    mintnet_mnist, iresnet_mnist = (
        _config_model_size("mintnet_mnist", (1, 28, 28)),
        _config_model_size("mnist", (1, 28, 28)),
    )
    mintnet_cifar, iresnet_cifar = (
        _config_model_size("mintnet_cifar10", (3, 32, 32)),
        _config_model_size("cifar10", (3, 32, 32)),
    )
    assert 0.5 < mintnet_mnist / iresnet_mnist < 2.0, (mintnet_mnist, iresnet_mnist)
    assert mintnet_cifar / iresnet_cifar <= 0.26, (mintnet_cifar, iresnet_cifar)
    assert (mintnet_mnist, iresnet_mnist, mintnet_cifar, iresnet_cifar) == (536_588, 493_536, 10_646_712, 43_849_632)


def test_free_weights_of_a_masked_convolution_are_its_mask():
    from invertnet.layers import MaskedConv2d

    for out_channels, in_channels, kernel, data_channels, direction in [
        (1, 1, 3, 1, "lower"),
        (4, 4, 3, 2, "upper"),
        (6, 2, 5, 2, "lower"),
        (9, 9, 3, 3, "upper"),
    ]:
        layer = MaskedConv2d(in_channels, out_channels, kernel, data_channels=data_channels, direction=direction)
        assert layer.free_weights == int(layer.mask.sum())


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_density_evaluation_runs_to_the_papers_standard_error(name):
    """Behrmann et al. 2019, A.2: evaluation "such that the standard error is less than 0.0001 bit/dim"."""
    evaluation = load_config(name).evaluation
    assert evaluation.probe_standard_error_bits <= 1e-4 and evaluation.max_passes is None
    assert evaluation.bias_bits <= 1e-4


def test_the_toy_density_config_is_appendix_c3_as_written():
    """Appendix C.3: "100 residual blocks, where each residual connection is a multilayer perceptron with state
    sizes of 2-64-64-64-2 and ELU nonlinearities ... ActNorm after each residual block. The change in log density
    was computed exactly"."""
    from invertnet.layers import ActNorm, InvertibleResidual, SpectralNormLinear
    from invertnet.logdet import ExactLogDet

    model = load_config("two_moons_c3").model
    flow = model.builder(2, **model.builder_arguments())
    parts = list(flow.transform)
    assert len(parts) == 200
    assert all(isinstance(part, InvertibleResidual) for part in parts[0::2])
    assert all(isinstance(part, ActNorm) for part in parts[1::2])  # after each block
    for block in parts[0::2]:
        layers = [layer for layer in block.g if isinstance(layer, SpectralNormLinear)]
        sizes = [layers[0].in_features] + [layer.out_features for layer in layers]
        assert sizes == [2, 64, 64, 64, 2]
        assert isinstance(block.g[0], SpectralNormLinear)  # no activation before the first layer
        assert {type(module).__name__ for module in block.g if not isinstance(module, SpectralNormLinear)} == {"ELU"}
        assert isinstance(block.log_det_estimator, ExactLogDet)


def test_actnorm_placement_of_the_dense_flow():
    from invertnet.models import dense_iresnet_flow

    kinds = {
        placement: [type(part).__name__ for part in dense_iresnet_flow(2, n_blocks=2, actnorm=placement).transform]
        for placement in ("before", "after", "none")
    }
    assert kinds["before"] == ["ActNorm", "InvertibleResidual"] * 2
    assert kinds["after"] == ["InvertibleResidual", "ActNorm"] * 2
    assert kinds["none"] == ["InvertibleResidual"] * 2
    with pytest.raises(ValueError, match="actnorm must be 'before', 'after' or 'none'"):
        dense_iresnet_flow(2, n_blocks=1, actnorm="between")


@pytest.mark.parametrize("name, batch", [("isotopenet_synthetic", 256), ("residualnet_synthetic", 64)])
def test_the_spectra_configs_train_with_table_a2(name, batch):
    """Thesis Table A.2, task ADSQ: weight decay 0.05 for both, Adam at step size 0.0005, batches of 256
    (IsotopeNet) and 64 (ResidualNet), dropout 30% for IsotopeNet."""
    config = load_config(name)
    assert (config.train.optimizer, config.train.lr, config.train.weight_decay) == ("adam", 0.0005, 0.05)
    assert config.train.batch_size == batch
    if name.startswith("isotopenet"):
        assert config.model.dropout == 0.3


def test_the_spectra_networks_sizes_and_receptive_field():
    from invertnet.models import IsotopeNet, ResidualNet

    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    # Table 7.2's 13935 parameters include the batch norm after the locally connected layer (2 parameters)
    assert count(IsotopeNet(27286, locally_connected_kernel=5)) == 13935
    assert count(IsotopeNet(27286, locally_connected_kernel=5, locally_connected_norm=False)) == 13933
    assert IsotopeNet(2000).receptive_field() == 49  # Table 7.2 by Luo et al.'s formula; the thesis draws 43
    assert count(ResidualNet(27286)) == 2132130 and len(ResidualNet(27286).features) == 15  # Table A.1's count
    table = ResidualNet(27286, layout="table")
    assert len(table.features) == 12 and count(table) == 1622690  # Table A.1's rows read literally


def test_the_carbon_isotope_model_of_the_thesis():
    """Thesis 7.3.2: a Bernoulli model of the Averagine carbons; the full formula (IsoSpecPy) keeps more peaks."""
    from invertnet.data.isotopes import isotope_pattern

    for mass, carbon_peaks, full_peaks in ((1000.0, 4, 5), (4000.0, 8, 10)):
        assert len(isotope_pattern(mass, model="carbon")[0]) == carbon_peaks
        assert len(isotope_pattern(mass)[0]) == full_peaks
    masses, probabilities = isotope_pattern(1000.0, model="carbon", threshold=1e-12)
    carbons = round(4.9384 * 1000.0 / 111.1254)
    assert probabilities[1] / probabilities[0] == pytest.approx(carbons * 0.0107 / (1 - 0.0107))
    with pytest.raises(ValueError, match="model"):
        isotope_pattern(1000.0, model="deuterium")
