"""IsotopeNet and ResidualNet (thesis Table 7.2, A.1), the locally connected layer, grouped folds, balanced
accuracy and sensitivity maps."""

import pytest
import torch
from torch import nn

from invertnet.analysis.sensitivity import sensitivity_map, top_sensitive_bins
from invertnet.data import grouped_folds
from invertnet.models.spectra import IsotopeNet, LocallyConnected1d, ResidualLayer1d, ResidualNet, receptive_field
from invertnet.training import balanced_accuracy


def _trainable(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)


def test_isotopenet_matches_table_7_2():
    """13935 parameters: the reference's locally connected width 5 on 27286 bins, or the table's width 3 on
    38206-38220 bins (both give 1191 + (k + 2) L' + 4)."""
    reference = IsotopeNet(27286, locally_connected_kernel=5)
    assert reference.reduced_length == 1820 and _trainable(reference) == 13935
    for length in (38206, 38220):
        assert _trainable(IsotopeNet(length, locally_connected_kernel=3)) == 13935
    assert _trainable(IsotopeNet(38221, locally_connected_kernel=3)) != 13935
    net = IsotopeNet(1000).eval()
    shapes = []
    h = torch.randn(2, 1, 1000)
    for layer in net.features:
        h = layer(h)
        shapes.append(tuple(h.shape[1:]))
    assert shapes == [(8, 1000), (8, 200), (8, 200), (1, 67)]  # strides 1-5-1-3, maps 8-8-8-1
    assert net(torch.randn(3, 1, 1000)).shape == (3, 2)
    assert net.receptive_field() == 49 and net.receptive_field(include_locally_connected=True) == 79
    with pytest.raises(ValueError, match=r"\(B, 1, 1000\)"):
        net(torch.randn(3, 1000))


def test_residualnet_matches_table_a_1():
    net = ResidualNet(27286)
    assert _trainable(net) == 2132130
    layers = [(layer.second.out_channels, layer.stride) for layer in net.features]
    assert layers[:5] == [(16, 1), (32, 3), (32, 1), (64, 3), (64, 1)]
    assert layers[-2:] == [(128, 3), (256, 3)] and len(layers) == 15
    assert net.eval()(torch.randn(2, 1, 27286)).shape == (2, 2)


def test_residual_layer_shortcuts_and_locally_connected_layer():
    layer = ResidualLayer1d(1, 8, 3, stride=5)
    assert isinstance(layer.shortcut, nn.Conv1d) and layer(torch.randn(2, 1, 11)).shape == (2, 8, 3)
    assert isinstance(ResidualLayer1d(8, 8, 3).shortcut, nn.Identity)
    with pytest.raises(ValueError, match="odd"):
        ResidualLayer1d(1, 1, 4)
    torch.manual_seed(0)
    local = LocallyConnected1d(2, 3, length=6, kernel_size=3)
    with torch.no_grad():
        local.bias.normal_()
    x = torch.randn(4, 2, 6)
    padded = nn.functional.pad(x, (1, 1))
    expected = torch.empty(4, 3, 6)
    for position in range(6):  # every position has its own (3, 2 * 3) filter
        window = padded[:, :, position : position + 3].flatten(1)
        expected[:, :, position] = window @ local.weight[position].T + local.bias[:, position]
    torch.testing.assert_close(local(x), expected)
    with pytest.raises(ValueError, match="6 positions"):
        local(torch.randn(4, 2, 7))
    assert receptive_field([(3, 1), (3, 5), (3, 1)]) == 15


def test_grouped_folds_keep_groups_apart_and_balanced_accuracy():
    groups = torch.arange(40) // 5  # 8 groups of 5
    folds = grouped_folds(groups, n_folds=4, seed=1)
    tested = torch.cat([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(40))  # every sample tested exactly once
    for train, test in folds:
        assert not set(groups[train].tolist()) & set(groups[test].tolist())
        assert len(test) == 10
    with pytest.raises(ValueError, match="n_folds"):
        grouped_folds(groups, n_folds=9)
    labels = torch.tensor([0] * 90 + [1] * 10)
    always_zero = torch.zeros(100, dtype=torch.long)
    assert (always_zero == labels).double().mean() == 0.9
    assert balanced_accuracy(always_zero, labels) == 0.5  # not fooled by the class proportions
    with pytest.raises(ValueError):
        balanced_accuracy(always_zero[:5], labels)


def test_sensitivity_map_of_a_linear_classifier_is_its_weights():
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x = torch.randn(20, 1, 12)
    labels = torch.randint(0, 3, (20,))
    expected = linear[1].weight[labels].abs().mean(0).detach()
    torch.testing.assert_close(sensitivity_map(linear, x, labels, batch_size=7)[0], expected)
    assert linear.training  # the mode is restored
    assert top_sensitive_bins(torch.tensor([1.0, 9.0, 8.0, 0.0, 7.0, 2.0]), 2, min_separation=2).tolist() == [1, 4]


def test_the_roc_statistic_is_the_mann_whitney_auc_and_lda_finds_the_discriminative_bins():
    from scipy.stats import mannwhitneyu

    from invertnet.models import RocLda, roc_statistics

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(120, 40, generator=generator, dtype=torch.float64)
    y = torch.arange(120) % 2
    x[:, 3] += 1.5 * y
    x[:, 17] -= 1.0 * y
    statistics = roc_statistics(x, y)
    u = mannwhitneyu(x[y == 1].numpy(), x[y == 0].numpy(), axis=0).statistic
    torch.testing.assert_close(statistics, torch.from_numpy(abs(u / (60 * 60) - 0.5)))
    model = RocLda(k=2).fit(x, y)
    assert sorted(model.features.tolist()) == [3, 17]
    test = torch.randn(400, 40, generator=generator, dtype=torch.float64)
    labels = torch.arange(400) % 2
    test[:, 3] += 1.5 * labels
    test[:, 17] -= 1.0 * labels
    accuracy = (model.predict(test) == labels).double().mean().item()
    assert accuracy > 0.75  # two Gaussians 1.8 standard deviations apart: Bayes accuracy ~0.82
    with pytest.raises(ValueError, match="two classes"):
        roc_statistics(x, torch.zeros(120, dtype=torch.long))
    with pytest.raises(ValueError, match="k must be positive"):
        RocLda(0)


def test_core_level_balanced_accuracy_takes_each_cores_majority():
    from invertnet.training import core_balanced_accuracy

    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])  # core 2 is mostly class 0
    predictions = torch.tensor([0, 1, 0, 1, 0, 1, 1, 1, 0])  # majorities: 0, 1, 1
    assert core_balanced_accuracy(predictions, labels, groups) == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError, match="one shape"):
        core_balanced_accuracy(predictions, labels, groups[:3])
