"""Packaging: a small core install, optional dependencies imported only where a feature uses them (with an error
that names the extra), ranges rather than pins, the license, ``py.typed`` and one version source.

Offline and fast: pyproject.toml, constraints.txt and the Makefile are read as text; the only subprocesses are
fresh interpreters that import invertnet.
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra installs tomli
    import tomli as tomllib

from invertnet import _optional

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "invertnet"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]

CORE = {"torch", "numpy", "scipy", "safetensors", "tqdm", "pydantic", "click"}
OPTIONAL_MODULES = sorted(_optional.DISTRIBUTIONS)

# Modules that must import without any optional dependency: the library, the studies and the application (each
# optional dependency is imported where a feature uses it).
LIBRARY_MODULES = [
    "invertnet",
    "invertnet.core",
    "invertnet.layers",
    "invertnet.solvers",
    "invertnet.logdet",
    "invertnet.models",
    "invertnet.analysis",
    "invertnet.data",
    "invertnet.recovery",
    "invertnet.training",
    "invertnet.figures",
    "invertnet.experiments",
    "invertnet.experiments.stability",
    "invertnet.experiments.independence",
    "invertnet.experiments.recovery",
    "invertnet.experiments.receptive_field",
    "invertnet.experiments.demo",
    "invertnet.app.runs",
    "invertnet.app.crossvalidate",
    "invertnet.app.recover_file",
]


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string such as ``"torch>=2.4,<3"``."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, f"unparsable requirement {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _extra_names(extra: str) -> set[str]:
    """Distribution names an extra installs, with self-references such as ``invertnet[plots]`` expanded."""
    names = set()
    for requirement in EXTRAS[extra]:
        if _name(requirement) == "invertnet":
            for inner in re.search(r"\[(.*)\]", requirement).group(1).split(","):
                names |= _extra_names(inner.strip())
        else:
            names.add(_name(requirement))
    return names


def _fresh_interpreter(code: str) -> str:
    """Run ``code`` in a new interpreter that imports invertnet from this checkout; returns its stdout."""
    environment = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}
    environment["PYTHONPATH"] = str(ROOT / "src")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=environment, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_importing_the_library_loads_no_optional_dependency():
    code = f"""
import importlib, json, sys
optional = {OPTIONAL_MODULES!r}
loaded = {{}}
for module in {LIBRARY_MODULES!r}:
    importlib.import_module(module)
    new = sorted(name for name in optional if name in sys.modules and name not in sum(loaded.values(), []))
    if new:
        loaded[module] = new
print(json.dumps(loaded))
"""
    loaded = json.loads(_fresh_interpreter(code))
    assert loaded == {}, f"optional dependencies imported at import time (module: what it pulled in): {loaded}"


def test_plotting_uses_neither_pyplot_nor_a_global_backend(tmp_path):
    code = f"""
import sys
from pathlib import Path
import torch
import matplotlib
backend = dict.__getitem__(matplotlib.rcParams, "backend")  # rcParams["backend"] would resolve it through pyplot
from invertnet.analysis import layer_spectra, plot_layer_spectra
from invertnet.recovery import PhaseTransitionRow, plot_phase_transition
net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
plot_layer_spectra(layer_spectra(net, torch.randn(3)), Path({str(tmp_path)!r}) / "spectra.png")
row = PhaseTransitionRow(mask="uniform", rate=0.5, observed_rate=0.5, successes=3, trials=4)
plot_phase_transition([row], Path({str(tmp_path)!r}) / "phase.png")
assert "matplotlib.pyplot" not in sys.modules, "a plotting function imported pyplot"
assert dict.__getitem__(matplotlib.rcParams, "backend") is backend, "a plotting function changed the backend"
print("ok")
"""
    assert _fresh_interpreter(code).strip() == "ok"
    for name in ("spectra.png", "phase.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_module_calls_matplotlib_use():
    calling = {path.relative_to(SRC).as_posix() for path in SRC.rglob("*.py") if "matplotlib.use(" in path.read_text()}
    assert not calling, f"matplotlib.use changes a notebook's backend: {calling}"


def _plot_layer_spectra(tmp_path):
    from invertnet.analysis import layer_spectra, plot_layer_spectra

    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    plot_layer_spectra(layer_spectra(net, torch.randn(2)), tmp_path / "spectra.png")


def _load_digits(tmp_path):
    from invertnet.data import load_digits

    load_digits()


def _load_image_folder(tmp_path):
    from invertnet.data import load_image_folder

    load_image_folder(tmp_path)


def _read_imzml(tmp_path):
    from invertnet.data import read_imzml

    read_imzml(tmp_path / "missing.imzML")


def _isotope_pattern(tmp_path):
    from invertnet.data import isotope_pattern

    isotope_pattern(1234.5)


@pytest.mark.parametrize(
    ("use", "hidden", "distribution", "extra"),
    [
        (_plot_layer_spectra, ["matplotlib", "matplotlib.figure"], "matplotlib", "plots"),
        (_load_digits, ["sklearn", "sklearn.datasets"], "scikit-learn", "data"),
        (_load_image_folder, ["PIL", "PIL.Image"], "pillow", "data"),
        (_read_imzml, ["pyimzml", "pyimzml.ImzMLParser"], "pyimzML", "spectra"),
        (_isotope_pattern, ["IsoSpecPy", "IsoSpecPy.PeriodicTbl"], "IsoSpecPy", "spectra"),
    ],
    ids=["plots", "digits", "image-folder", "imzml", "isotopes"],
)
def test_a_missing_extra_is_an_error_that_names_it(use, hidden, distribution, extra, tmp_path, monkeypatch):
    for module in hidden:  # None in sys.modules makes `import module` raise ImportError
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"needs {distribution}: pip install 'invertnet\[{extra}\]'") as error:
        use(tmp_path)
    assert isinstance(error.value.__cause__, ImportError)


def test_every_require_names_an_extra_that_installs_the_module():
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "require":
                if all(isinstance(argument, ast.Constant) for argument in node.args[:2]):
                    module, extra = (argument.value for argument in node.args[:2])
                    calls.append((path.name, module, extra))
    assert len(calls) >= 6, calls  # figures, isotopes (2), imzml, images, folders
    from invertnet.app.kinds import KINDS

    calls += [(f"kind {name}", module, extra) for name, kind in KINDS.items() for module, extra, _ in kind.requires]
    for file, module, extra in calls:
        assert extra in EXTRAS, f"{file}: require({module!r}, {extra!r}) names no extra of pyproject.toml"
        distribution = _name(_optional.distribution(module))
        assert distribution in _extra_names(extra), f"{file}: extra {extra!r} does not install {distribution}"
        assert distribution in _extra_names("all"), f"{distribution} is missing from the 'all' extra"


def test_core_dependencies_are_small_and_ranges():
    dependencies = PROJECT["dependencies"]
    assert {_name(requirement) for requirement in dependencies} == CORE
    for requirement in dependencies + [r for extra, rs in EXTRAS.items() if extra != "bench" for r in rs]:
        assert "==" not in requirement, f"{requirement}: pin exact versions in constraints.txt, not in pyproject"
    (torch_requirement,) = (requirement for requirement in dependencies if _name(requirement) == "torch")
    assert re.fullmatch(r"torch>=2\.\d+,<3", torch_requirement), torch_requirement


def test_extras():
    assert {"spectra", "plots", "data", "tensorboard", "bench", "test", "dev", "all"} <= set(EXTRAS)
    assert _extra_names("spectra") == {"isospecpy", "pyimzml"}
    assert _extra_names("plots") == {"matplotlib"}
    assert _extra_names("all") == {"isospecpy", "pyimzml", "matplotlib", "scikit-learn", "pillow", "tensorboard"}
    assert not _extra_names("bench") & _extra_names("all")
    assert {"pytest", "hypothesis", "pytest-xdist"} <= _extra_names("test") <= _extra_names("dev")


def test_reproducible_pins_live_in_the_makefile_and_constraints():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_name(name)] = version
    assert pins["torch"] == "2.13.0"
    wanted = CORE | _extra_names("all") | _extra_names("dev")
    assert wanted - {"tomli"} <= set(pins), f"unpinned in constraints.txt: {sorted(wanted - set(pins))}"
    makefile = (ROOT / "Makefile").read_text()
    torch_install = makefile.index("pip install --quiet torch==2.13.0")
    package_install = makefile.index("$(PIP_INSTALL) -e '.[all,test,dev]'")
    assert torch_install < package_install
    assert "PIP_INSTALL := $(BIN)/pip install --quiet -c constraints.txt" in makefile


def test_license_and_typing_marker_ship():
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "invertnet developers" in text
    (setuptools,) = (r for r in PYPROJECT["build-system"]["requires"] if _name(r) == "setuptools")
    assert int(re.search(r">=(\d+)", setuptools).group(1)) >= 77, "SPDX license strings need setuptools >= 77"
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["invertnet"]
    assert (SRC / "py.typed").is_file()


def test_one_version_source():
    assert "version" not in PROJECT and "version" in PROJECT["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "invertnet.__version__"}
    assignments = [
        node
        for node in ast.parse((SRC / "__init__.py").read_text()).body
        if isinstance(node, ast.Assign) and node.targets[0].id == "__version__"
    ]
    assert len(assignments) == 1 and isinstance(assignments[0].value, ast.Constant)  # setuptools reads it statically
    import invertnet

    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", invertnet.__version__)


def test_require_returns_the_module_and_refuses_unknown_ones():
    assert _optional.require("torch.utils.tensorboard", "tensorboard").__name__ == "torch.utils.tensorboard"
    with pytest.raises(KeyError, match="not an optional dependency"):
        _optional.require("torch.nn", "plots")


def test_the_embedded_configs_ship_as_package_data():
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["invertnet.app"]
    shipped = {path.name for pattern in patterns for path in (SRC / "app").glob(pattern)}
    from invertnet.app.config import embedded_configs

    assert shipped == {f"{name}.json" for name in embedded_configs()} and len(shipped) > 10
