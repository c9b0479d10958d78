"""Hostile configuration for the loader every daemon uses (protocol/config.py): arbitrary `--set`
overrides, arbitrary TOML documents and arbitrary file bytes against the engine's, the reference
server's and `tidal run`'s configs. Only `ConfigError` escapes, and it names what was wrong: the key of
the override (or the part of it that does not exist), or the file."""

from __future__ import annotations

import msgspec
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tidal.engine.config import EngineConfig
from tidal.engine.reference.config import ServeConfig
from tidal.engine.runconfig import RunConfig
from tidal.protocol.config import load_config, load_partial
from tidal.protocol.errors import ConfigError

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CONFIGS = {"engine": EngineConfig, "serve": ServeConfig, "run": RunConfig}


def dotted_keys(value, prefix: str = "") -> list[str]:
    """Every dotted key of a config's defaults (sections and leaves)."""
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            key = f"{prefix}.{k}" if prefix else k
            out += [key, *dotted_keys(v, key)]
    return out


KEYS = {name: dotted_keys(msgspec.to_builtins(load_config(cls))) for name, cls in CONFIGS.items()}

toml_value = st.one_of(
    st.integers().map(str), st.floats().map(lambda f: repr(f).replace("inf", "inf").replace("nan", "nan")),
    st.sampled_from(["true", "false", '""', "[]", "{}", "[1, 2]", '["a"]', "{type = \"x\"}", "-1", "0", "1e999",
                     "-inf", "nan", "9" * 40, '"' + "a" * 5000 + '"', "[[1]]", "{a = {b = 1}}", "1979-05-27"]),
    st.text(max_size=12),
)


def key_for(name: str):
    real = st.sampled_from(KEYS[name])
    return st.one_of(real, real, st.tuples(real, st.text(min_size=1, max_size=6)).map(".".join),
                     st.text(max_size=12))


def named(msg: str, key: str) -> bool:
    """The message names the key, or the first part of it that does not exist, or the override itself."""
    parts = key.strip().split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(p and p in msg for p in prefixes)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_hostile_override_is_a_config_error_naming_its_key(name):
    cls = CONFIGS[name]

    @FUZZ
    @given(key_for(name), toml_value)
    def run(key, value):
        override = f"{key}={value}"
        try:
            load_config(cls, overrides=[override])
        except ConfigError as exc:
            given_key = override.partition("=")[0]  # what the loader reads as the key
            assert named(str(exc), given_key) or repr(override) in str(exc), f"{override!r}: {exc}"

    run()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_many_overrides_only_raise_config_error(name):
    cls = CONFIGS[name]

    @FUZZ
    @given(st.lists(st.one_of(st.tuples(key_for(name), toml_value).map("=".join), st.text(max_size=20)), max_size=6))
    def run(overrides):
        for loader in (load_config, load_partial):
            try:
                loader(cls, overrides=overrides)
            except ConfigError as exc:
                assert str(exc)

    run()


def toml_doc(name: str):
    leaf = st.one_of(st.integers(-(2 ** 63), 2 ** 63 - 1), st.floats(), st.booleans(), st.text(max_size=8),
                     st.lists(st.integers(), max_size=3))
    keys = st.one_of(st.sampled_from(sorted({k.split(".")[-1] for k in KEYS[name]})), st.text(min_size=1, max_size=6))
    return st.recursive(st.dictionaries(keys, leaf, max_size=4),
                        lambda inner: st.dictionaries(keys, st.one_of(leaf, inner, st.lists(inner, max_size=2)),
                                                      max_size=4), max_leaves=12)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_hostile_toml_file_is_a_config_error_naming_the_file(name, tmp_path):
    cls = CONFIGS[name]
    path = tmp_path / "hostile.toml"

    @FUZZ
    @given(st.one_of(toml_doc(name).map(lambda d: tomli_w.dumps(d).encode()), st.binary(max_size=200),
                     st.text(max_size=200).map(str.encode)))
    def run(raw):
        path.write_bytes(raw)
        try:
            load_config(cls, path)
        except ConfigError as exc:
            assert str(path) in str(exc), str(exc)

    run()
