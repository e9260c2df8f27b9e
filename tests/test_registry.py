"""The registry every extension point uses, and how its entries become options of a Hydra config group."""

from dataclasses import dataclass

import pytest

from ranprm.errors import ConfigError
from ranprm.utils.registry import ALL_REGISTRIES, Registry


@dataclass
class _ToyConfig:
    name: str = "toy_option"
    width: int = 3


def test_register_get_and_errors_name_the_option_and_the_choices():
    registry: Registry = Registry("widget", "widget.name")
    try:
        registry.register("b")(2)
        registry.register("a")(1)
        assert registry.get("a") == 1 and registry.names() == ["a", "b"] and "b" in registry and len(registry) == 2
        with pytest.raises(ConfigError, match=r"widget\.name='c' is not a known widget; choose one of \['a', 'b'\]"):
            registry.get("c")
        with pytest.raises(ValueError, match="registered twice"):
            registry.register("a")(3)
        with pytest.raises(TypeError, match="needs a field `name: str = 'x'`"):
            registry.register("x", config=_ToyConfig)
    finally:
        ALL_REGISTRIES.remove(registry)


def test_an_entry_with_a_config_is_a_typed_option_of_its_group_without_yaml():
    from ranprm.cli.config import compose
    from ranprm.errors import ConfigError

    registry: Registry = Registry("widget", "retrieval.name", group="retrieval")
    try:
        registry.register("toy_option", config=_ToyConfig)(object())
        cfg = compose("train", ["retrieval=toy_option", "retrieval.width=5"])
        assert dict(cfg.retrieval) == {"name": "toy_option", "width": 5}
        with pytest.raises(ConfigError, match=r"^retrieval\.width='abc' must be an integer$"):
            compose("train", ["retrieval=toy_option", "retrieval.width=abc"])  # the dataclass types the option
    finally:
        ALL_REGISTRIES.remove(registry)
