"""benchmarks/gpu_table5.py: without a GPU it says so and exits 0; its models run (a smoke step, untimed)."""

from __future__ import annotations

import json

import pytest
import torch

from invertnet.layers import SpectralNormConv2d
from tests.scripts import load_script


@pytest.fixture(scope="module")
def table5():
    return load_script("benchmarks/gpu_table5.py")


def test_without_a_gpu_it_says_so_and_exits_zero(table5, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(table5, "table", lambda arguments: pytest.fail("nothing may be timed without a GPU"))
    assert table5.main([]) == 0
    assert "no CUDA GPU is present" in capsys.readouterr().out


def test_the_smoke_run_steps_every_model(table5, monkeypatch, capsys):
    torch.set_num_threads(1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert table5.main(["--smoke"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and set(report["models"]) == set(table5.MODELS)
    for row in report["models"].values():
        assert row["finite_gradients"] and torch.isfinite(torch.tensor(row["loss"]))


def test_the_plain_i_resnet_is_the_same_map_without_normalisation(table5):
    flow = table5.iresnet_flow("smoke")
    plain = table5.without_spectral_norm(flow.transform)
    assert not any(isinstance(module, SpectralNormConv2d) for module in plain.modules())
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in flow.transform.parameters())
    with torch.no_grad():
        for module in flow.modules():
            if isinstance(module, SpectralNormConv2d):
                module.coeff = 1e6  # normalisation inactive: W / max(1, sigma / c) = W
        flow.eval()
        x = torch.randint(0, 256, (2, 3, 32, 32)).float()
        flow.transform[0].noise = plain[0].noise = "midpoint"
        torch.testing.assert_close(plain.eval()(x), flow.transform(x))
