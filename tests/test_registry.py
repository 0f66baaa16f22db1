"""The registry: built-ins found through entry points, third parties the same way, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import peftkit
from peftkit import registry
from peftkit.errors import ConfigError, UnknownMethodError


def test_builtin_methods_are_discovered_through_entry_points() -> None:
    assert {"lora"} <= set(peftkit.available_methods())
    assert peftkit.get_method("lora").__module__ == "variants.lora"


def test_unknown_method_lists_registered_names_and_closest_match() -> None:
    with pytest.raises(UnknownMethodError) as error:
        peftkit.get_method("lroa")
    message = str(error.value)
    assert "'lroa'" in message and "Did you mean 'lora'?" in message
    for name in peftkit.available_methods():
        assert name in message


def test_import_peftkit_imports_no_variant_and_no_bitsandbytes() -> None:
    code = (
        "import sys, peftkit; print(sorted(m for m in sys.modules if m.split('.')[0] in ('variants', 'bitsandbytes')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_core_source_never_imports_variants() -> None:
    core = Path(peftkit.__file__).parent
    offenders = [
        p.name for p in core.rglob("*.py") if "import variants" in p.read_text() or "from variants" in p.read_text()
    ]
    assert offenders == []


PLUGIN = '''
import dataclasses
import torch
from torch import nn
from peftkit import Adapter, AdapterMethod, MethodConfig, peft_option

@dataclasses.dataclass
class ScaleConfig(MethodConfig):
    init: float = peft_option(0.0)

class ScaleAdapter(Adapter):
    """Adds a trained per-feature scale of the base output."""
    def __init__(self, features):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(features))
    def forward(self, x, base_output, base_layer):
        return base_output * self.scale

class OutputScale(AdapterMethod):
    name = "output_scale"
    description = "test plugin"
    config_class = ScaleConfig
    def adaptable_types(self):
        return (nn.Linear,)
    def create_adapter(self, base_layer, module_name):
        adapter = ScaleAdapter(base_layer.out_features)
        nn.init.constant_(adapter.scale, self.config.init)
        return adapter
'''


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(registry, "_discovered", False)


def _install_plugin(root: Path, monkeypatch: pytest.MonkeyPatch, entry: str) -> None:
    """A third-party distribution on sys.path: a module plus dist-info naming its entry point."""
    (root / "thirdparty_scale.py").write_text(PLUGIN)
    info = root / "thirdparty_scale-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-scale\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[peftkit.methods]\n{entry}\n")
    monkeypatch.syspath_prepend(str(root))


def test_third_party_method_registers_through_entry_point_and_is_picked_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    _install_plugin(tmp_path, monkeypatch, "output_scale = thirdparty_scale:OutputScale")
    assert "output_scale" in peftkit.available_methods()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    base = model(x)
    peftkit.adapt(model, "output_scale", target_modules=["0"], init=0.5)
    torch.testing.assert_close(model(x), base * 1.5)
    assert peftkit.trainable_parameters(model) == (3, 4 * 3 + 3 + 3)


def test_broken_plugin_does_not_hide_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    _install_plugin(tmp_path, monkeypatch, "broken = thirdparty_scale:DoesNotExist")
    with pytest.warns(UserWarning, match="broken"):
        names = peftkit.available_methods()
    assert "lora" in names and "broken" not in names
    with pytest.raises(UnknownMethodError, match="failed to load"):
        peftkit.get_method("broken")


def test_register_method_decorator_and_name_clash(fresh_registry: None) -> None:
    lora = peftkit.get_method("lora")

    @peftkit.register_method
    class Renamed(lora):
        name = "lora_renamed"

    assert peftkit.get_method("lora_renamed") is Renamed

    with pytest.raises(ConfigError, match="already registered"):

        @peftkit.register_method
        class Clash(lora):
            name = "lora"


def _plugin_module(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin's module on sys.path, with no distribution declaring it."""
    (root / "thirdparty_scale.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(root))


def test_a_dotted_path_names_a_method_that_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    _plugin_module(tmp_path, monkeypatch)
    path = "thirdparty_scale:OutputScale"
    assert "output_scale" not in peftkit.available_methods()
    assert peftkit.get_method(path).__name__ == "OutputScale"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    base = model(x)
    peftkit.adapt(model, path, target_modules=["0"], init=0.25)
    torch.testing.assert_close(model(x), base * 1.25)
    # Saved with its path, so it loads back without being installed either.
    peftkit.save_adapter(model, tmp_path / "adapter")
    fresh = nn.Sequential(nn.Linear(4, 3))
    fresh.load_state_dict(model[0].base_layer.state_dict(prefix="0."))
    peftkit.load_adapter(fresh, tmp_path / "adapter")
    assert type(peftkit.adapter_methods(fresh)["default"]).__name__ == "OutputScale"
    torch.testing.assert_close(fresh(x), base * 1.25)


def test_a_dotted_path_is_validated_like_a_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None
) -> None:
    _plugin_module(tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match=r"method 'output_scale' has no option 'int'\. Did you mean 'init'\?"):
        peftkit.get_method("thirdparty_scale:OutputScale").from_options(int=1.0)
    with pytest.raises(UnknownMethodError, match=r"cannot import module 'no_such_package\.mod'"):
        peftkit.get_method("no_such_package.mod:Method")
    with pytest.raises(UnknownMethodError, match=r"module 'thirdparty_scale' has no attribute 'Missing'"):
        peftkit.get_method("thirdparty_scale:Missing")
    with pytest.raises(UnknownMethodError, match=r"'thirdparty_scale:ScaleConfig' is .*not a concrete AdapterMethod"):
        peftkit.get_method("thirdparty_scale:ScaleConfig")
