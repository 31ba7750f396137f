"""KVortexConfig: defaults, precedence of every source, error messages, provenance."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvortex_core import ConfigError, KVortexConfig, StorageBackend, hookimpl
from kvortex_core.config.provenance import Source, provenance
from kvortex_core.testing import MemoryBackend

GiB = 1024**3
MiB = 1024**2


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No KVORTEX_* variable from the caller's shell leaks into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("KVORTEX_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write_yaml(tmp_path: Path, text: str, name: str = "kvortex.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
chunk_tokens: 128
tiers:
  hot:
    type: cpu
    capacity: 1GiB
eviction:
  policy: lru
"""


# --- defaults and human sizes ------------------------------------------------------------


def test_defaults() -> None:
    config = KVortexConfig()
    assert config.chunk_tokens == 256
    assert config.hash_algorithm == "sha256"
    assert config.eviction.high_watermark == 0.8
    assert config.eviction.evict_ratio == 0.2
    assert list(config.tiers) == ["cpu"]
    assert config.tiers["cpu"].type == "cpu"
    assert config.tiers["cpu"].capacity == 4 * GiB
    assert config.transfer.staging_bytes == 64 * MiB
    assert config.source_file is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * GiB),
        ("512MiB", 512 * MiB),
        ("1.5GiB", 3 * GiB // 2),
        ("4096", 4096),
        ("2GB", 2 * 10**9),
    ],
)
def test_capacity_accepts_human_units(text: str, expected: int) -> None:
    config = KVortexConfig(tiers={"hot": {"type": "cpu", "capacity": text}})
    assert config.tiers["hot"].capacity == expected


def test_tier_order_is_kept_and_options_are_split() -> None:
    config = KVortexConfig(
        tiers={
            "hot": {"type": "cpu", "capacity": "1GiB"},
            "warm": {"type": "disk", "capacity": "10GiB", "path": "/tmp/kv", "fsync": False},
        }
    )
    assert config.tier_names == ["hot", "warm"]
    assert config.tiers["warm"].options == {"path": "/tmp/kv", "fsync": False}
    assert config.tiers["hot"].options == {}


# --- precedence: each source overrides the one below ------------------------------------


def test_yaml_overrides_defaults(tmp_path: Path) -> None:
    config = KVortexConfig.load(write_yaml(tmp_path, BASE))
    assert config.chunk_tokens == 128
    assert config.eviction.policy == "lru"
    assert config.eviction.high_watermark == 0.8  # untouched keys keep their defaults
    assert list(config.tiers) == ["hot"]  # YAML tiers replace the default tier


def test_config_file_env_names_the_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVORTEX_CONFIG_FILE", str(write_yaml(tmp_path, BASE)))
    assert KVortexConfig().chunk_tokens == 128
    other = write_yaml(
        tmp_path, "chunk_tokens: 64\n" + BASE.replace("chunk_tokens: 128", ""), "b.yaml"
    )
    assert KVortexConfig.load(other).chunk_tokens == 64  # an explicit file wins over the env


def test_env_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVORTEX_CHUNK_TOKENS", "512")
    monkeypatch.setenv("KVORTEX_TIERS__HOT__CAPACITY", "2GiB")
    monkeypatch.setenv("KVORTEX_EVICTION__POLICY", "s3fifo")
    config = KVortexConfig.load(write_yaml(tmp_path, BASE))
    assert config.chunk_tokens == 512
    assert config.tiers["hot"].capacity == 2 * GiB
    assert config.tiers["hot"].type == "cpu"  # nested env merges into the YAML tier
    assert config.eviction.policy == "s3fifo"


def test_env_alone_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVORTEX_CHUNK_TOKENS", "512")
    monkeypatch.setenv("KVORTEX_EVICTION__HIGH_WATERMARK", "0.9")
    monkeypatch.setenv("KVORTEX_TIERS", '{"hot": {"type": "cpu", "capacity": "3GiB"}}')
    config = KVortexConfig()
    assert config.chunk_tokens == 512
    assert config.eviction.high_watermark == 0.9
    assert config.tiers["hot"].capacity == 3 * GiB


def test_env_resizes_the_default_cpu_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVORTEX_TIERS__CPU__CAPACITY", "8GiB")
    config = KVortexConfig()
    assert list(config.tiers) == ["cpu"]
    assert config.tiers["cpu"].type == "cpu"  # from the default tier
    assert config.tiers["cpu"].capacity == 8 * GiB
    rows = provenance(config)
    assert rows["tiers.cpu.type"][1] == Source("default")
    assert rows["tiers.cpu.capacity"][1] == Source("env", "KVORTEX_TIERS__CPU__CAPACITY")


def test_arguments_override_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVORTEX_CHUNK_TOKENS", "512")
    monkeypatch.setenv("KVORTEX_TIERS__HOT__CAPACITY", "2GiB")
    monkeypatch.setenv("KVORTEX_EVICTION__HIGH_WATERMARK", "0.9")
    config = KVortexConfig.load(
        write_yaml(tmp_path, BASE),
        chunk_tokens=1024,
        tiers={"hot": {"capacity": "4GiB"}},
        eviction={"policy": "prefix-lru"},
    )
    assert config.chunk_tokens == 1024
    assert config.tiers["hot"].capacity == 4 * GiB
    assert config.tiers["hot"].type == "cpu"  # from YAML, under both
    assert config.eviction.policy == "prefix-lru"
    assert config.eviction.high_watermark == 0.9  # env still applies where arguments are silent


# --- error messages ----------------------------------------------------------------------


def load_error(tmp_path: Path, text: str = BASE, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as err:
        KVortexConfig.load(write_yaml(tmp_path, text), **kwargs)
    return str(err.value)


def test_a_number_where_text_belongs_says_to_quote_it(tmp_path: Path) -> None:
    message = load_error(tmp_path, BASE + "salt: 7\n")
    assert "salt = 7" in message and 'quote it to give text: salt: "7"' in message


def test_an_unknown_key_given_as_a_mapping_names_where_it_came_from(tmp_path: Path) -> None:
    assert "nope = {'x': 1} (from argument): unknown key" in load_error(tmp_path, nope={"x": 1})
    message = load_error(tmp_path, BASE + "nope:\n  x: 1\n")
    assert "nope = {'x': 1} (from " in message and "kvortex.yaml" in message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = load_error(tmp_path, BASE + "chunk_tokenz: 5\n")
    assert "chunk_tokenz = 5" in message
    assert "unknown key" in message
    assert "did you mean 'chunk_tokens'" in message
    assert "KVORTEX_CHUNK_TOKENZ" in message
    assert f"from YAML {tmp_path / 'kvortex.yaml'}" in message


def test_unknown_nested_key(tmp_path: Path) -> None:
    message = load_error(tmp_path, BASE.replace("policy: lru", "polcy: lru"))
    assert "eviction.polcy = 'lru'" in message
    assert "did you mean 'policy'" in message
    assert "valid keys here: evict_ratio, high_watermark, policy" in message
    assert "KVORTEX_EVICTION__POLCY" in message


def test_unknown_backend_option(tmp_path: Path) -> None:
    text = (
        BASE + "  cold:\n    type: disk\n    capacity: 1GiB\n    path: /tmp/x\n    fsink: false\n"
    )
    text = text.replace("eviction:\n  policy: lru\n", "") + "eviction: {policy: lru}\n"
    message = load_error(tmp_path, text)
    assert "tiers.cold.fsink = False" in message
    assert "unknown option (did you mean 'fsync'?)" in message
    assert "KVORTEX_TIERS__COLD__FSINK" in message
    assert "valid options of 'disk'" in message


def test_misspelt_common_tier_key(tmp_path: Path) -> None:
    message = load_error(tmp_path, BASE.replace("capacity: 1GiB", "capacty: 1GiB"))
    assert "tiers.hot.capacity = (missing)" in message
    assert "misspelt as 'capacty'" in message


def test_unknown_env_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVORTEX_CHUNK_TOKEN", "512")
    message = load_error(tmp_path)
    assert "KVORTEX_CHUNK_TOKEN " in message and "KVORTEX_CHUNK_TOKENS" in message


@pytest.mark.parametrize("name", ["KVORTEX_TORCH_SPEC", "KVORTEX_PYTHON", "KVORTEX_VENV", "KVORTEX_VLLM_EXTRA"])
def test_the_setup_scripts_variables_are_not_settings_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    """README tells users to set these for scripts/setup; the same shell then runs the demo."""
    monkeypatch.setenv(name, "torch==2.13.0")
    assert KVortexConfig.load(write_yaml(tmp_path, BASE)).chunk_tokens > 0


def test_unknown_nested_env_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVORTEX_EVICTION__POLCY", "lru")
    message = load_error(tmp_path)
    assert "eviction.polcy = 'lru' (from env KVORTEX_EVICTION__POLCY): unknown key" in message


def test_wrong_type_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVORTEX_CHUNK_TOKENS", "many")
    message = load_error(tmp_path)
    assert "chunk_tokens = 'many' (from env KVORTEX_CHUNK_TOKENS)" in message
    assert "valid integer" in message
    assert "YAML key 'chunk_tokens'" in message


def test_wrong_literal_lists_valid_values(tmp_path: Path) -> None:
    message = load_error(tmp_path, BASE.replace("policy: lru", "policy: mru"))
    assert "eviction.policy = 'mru'" in message
    assert "'lru', 'prefix-lru' or 's3fifo'" in message


@pytest.mark.parametrize("capacity", ["-1", "-1GiB", "0"])
def test_negative_or_zero_size(tmp_path: Path, capacity: str) -> None:
    message = load_error(tmp_path, BASE.replace("capacity: 1GiB", f"capacity: {capacity}"))
    assert "tiers.hot.capacity = " in message
    assert "KVORTEX_TIERS__HOT__CAPACITY" in message
    assert "positive size such as '8GiB'" in message


@pytest.mark.parametrize("capacity", ["8GiB garbage", "64MB/s", "1GiB 2GiB"])
def test_text_after_a_size_is_an_error_not_ignored(tmp_path: Path, capacity: str) -> None:
    """pydantic's ByteSize reads the leading size of any text: '8GiB garbage' was 8 GiB."""
    message = load_error(tmp_path, BASE.replace("capacity: 1GiB", f"capacity: {capacity}"))
    assert f"tiers.hot.capacity = '{capacity}'" in message
    assert "is not a size: give a number and one unit" in message


def test_backend_size_options_take_sizes_as_the_engine_settings_do() -> None:
    from pydantic import ValidationError

    from kvortex_backends.redis import RedisOptions

    assert RedisOptions(url="redis://h", part_bytes="4 MiB").part_bytes == 4 * 1024**2
    assert RedisOptions(url="redis://h", part_bytes=None).part_bytes is None
    for bad, says in (("4MiB junk", "is not a size"), (True, "is not a size"), ("1.5", "not a whole number")):
        with pytest.raises(ValidationError, match=says):
            RedisOptions(url="redis://h", part_bytes=bad)


def test_negative_size_from_argument(tmp_path: Path) -> None:
    message = load_error(tmp_path, transfer={"staging_bytes": -4096})
    assert "transfer.staging_bytes = -4096 (from argument)" in message
    assert "KVORTEX_TRANSFER__STAGING_BYTES" in message


def test_unknown_backend_type(tmp_path: Path) -> None:
    message = load_error(tmp_path, BASE.replace("type: cpu", "type: memroy"))
    assert "tiers.hot.type = 'memroy'" in message
    assert "unknown backend type 'memroy'" in message
    assert "memory" in message.split("registered backends:")[1]  # what would be valid
    assert "KVORTEX_TIERS__HOT__TYPE" in message


class NeedsSdk(MemoryBackend):
    requires = ("kvortex_no_such_sdk_module",)
    install_hint = 'pip install "kvortex-backends[redis]"'


class NeedsSdkPlugin:
    @hookimpl
    def kvortex_register_backends(self, register):  # type: ignore[no-untyped-def]
        register("needs-sdk", NeedsSdk)


def test_missing_optional_dependency_gives_install_line(tmp_path: Path) -> None:
    ok = KVortexConfig.load(write_yaml(tmp_path, BASE), plugins=[NeedsSdkPlugin()])
    assert ok.tiers["hot"].type == "cpu"  # registered but unused: no error
    message = load_error(
        tmp_path, BASE.replace("type: cpu", "type: needs-sdk"), plugins=[NeedsSdkPlugin()]
    )
    assert "tiers.hot.type = 'needs-sdk'" in message
    assert "kvortex_no_such_sdk_module" in message
    assert 'pip install "kvortex-backends[redis]"' in message


def test_every_problem_in_one_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVORTEX_TRANSFER__NUM_STREAMS", "x")
    message = load_error(tmp_path, BASE.replace("policy: lru", "polcy: lru"), chunk_tokens=-1)
    assert message.startswith("invalid KVortex configuration:")
    for fragment in (
        "chunk_tokens = -1 (from argument)",
        "eviction.polcy",
        "transfer.num_streams = 'x' (from env KVORTEX_TRANSFER__NUM_STREAMS)",
    ):
        assert fragment in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("chunk_tokens: [1\n", "is not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_broken_yaml_file(tmp_path: Path, text: str, fragment: str) -> None:
    assert fragment in load_error(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("tiers:\n  cpu: {type: cpu, capacity: 1GiB}\nlog_level: INFO\ntiers:\n  cpu: {type: cpu, capacity: 2GiB}\n",
         "line 4: the key 'tiers' is given twice (first on line 1)"),
        ("tiers:\n  cpu:\n    type: cpu\n    capacity: 1GiB\n    capacity: 2GiB\n",
         "line 5: the key 'capacity' is given twice (first on line 4)"),
    ],
)
def test_a_key_given_twice_in_yaml_is_refused(tmp_path: Path, text: str, fragment: str) -> None:
    """YAML loaders keep the last of two equal keys: a second ``tiers:`` block silently dropped
    the first one's tiers."""
    message = load_error(tmp_path, text)
    assert fragment in message and "merge them into one" in message


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {type: cpu, capacity: 1GiB}\ntiers:\n  cpu:\n    <<: *b\n    capacity: 2GiB\n")
    from kvortex_core.config.sources import read_yaml

    assert read_yaml(path)["tiers"]["cpu"] == {"type": "cpu", "capacity": "2GiB"}


def test_missing_yaml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVORTEX_CONFIG_FILE", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="does not exist.*KVORTEX_CONFIG_FILE"):
        KVortexConfig()


def test_empty_tiers_rejected() -> None:
    with pytest.raises(ConfigError, match="at least one tier"):
        KVortexConfig(tiers={})


# --- plugins given to load ----------------------------------------------------------------


class Custom(MemoryBackend):
    pass


class CustomPlugin:
    @hookimpl
    def kvortex_register_backends(self, register):  # type: ignore[no-untyped-def]
        register("custom", Custom)


def test_load_checks_types_against_given_plugins() -> None:
    tiers = {"cpu": {"type": "cpu", "capacity": "1MiB"}, "t": {"type": "custom", "capacity": "1MiB"}}
    with pytest.raises(ConfigError, match="unknown backend type 'custom'"):
        KVortexConfig(tiers=tiers)
    config = KVortexConfig.load(plugins=[CustomPlugin()], tiers=tiers)
    assert config.tiers["t"].type == "custom"
    assert issubclass(Custom, StorageBackend)


# --- provenance ---------------------------------------------------------------------------


def test_provenance_names_every_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_yaml(tmp_path, BASE)
    monkeypatch.setenv("KVORTEX_TIERS__HOT__CAPACITY", "2GiB")
    monkeypatch.setenv("KVORTEX_EVICTION__POLICY", "s3fifo")
    config = KVortexConfig.load(path, salt="tenant-7")
    rows = provenance(config)
    assert rows["salt"] == ("tenant-7", Source("argument"))
    assert rows["tiers.hot.capacity"] == (2 * GiB, Source("env", "KVORTEX_TIERS__HOT__CAPACITY"))
    assert rows["eviction.policy"] == ("s3fifo", Source("env", "KVORTEX_EVICTION__POLICY"))
    assert rows["chunk_tokens"] == (128, Source("yaml", str(path)))
    assert rows["tiers.hot.type"] == ("cpu", Source("yaml", str(path)))
    assert rows["eviction.high_watermark"] == (0.8, Source("default"))
    assert rows["tiers.hot.write_through"] == (False, Source("default"))
    assert str(rows["tiers.hot.capacity"][1]) == "env KVORTEX_TIERS__HOT__CAPACITY"
    assert str(rows["chunk_tokens"][1]) == f"YAML {path}"


def test_provenance_of_json_env_and_backend_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "KVORTEX_TIERS",
        '{"cpu": {"type": "cpu", "capacity": "1GiB"}, '
        '"cold": {"type": "disk", "capacity": "1GiB", "path": "/tmp/k"}}',
    )
    rows = provenance(KVortexConfig())
    assert rows["tiers.cold.path"] == ("/tmp/k", Source("env", "KVORTEX_TIERS"))
    assert rows["chunk_tokens"][1] == Source("default")


# --- the documented examples are valid ------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def yaml_blocks(path: Path) -> list[str]:
    text = path.read_text()
    return [block.split("```", 1)[0] for block in text.split("```yaml\n")[1:]]


@pytest.mark.parametrize("doc", ["README.md", "docs/configuration.md"])
def test_documented_yaml_examples_load(doc: str, tmp_path: Path) -> None:
    blocks = yaml_blocks(ROOT / doc)
    assert blocks, f"{doc} has no yaml example"
    for i, block in enumerate(blocks):
        config = KVortexConfig.load(write_yaml(tmp_path, block, f"example{i}.yaml"))
        assert config.tier_names[0] == "cpu"


# --- credentials never appear in messages ----------------------------------------------------


def test_error_messages_mask_credentials(tmp_path: Path) -> None:
    text = BASE + "  team: {type: redis, capacity: 1GiB, password: 5, pasword: hunter2}\n"
    text = text.replace("eviction:\n  policy: lru\n", "") + "eviction: {policy: lru}\n"
    message = load_error(tmp_path, text)
    assert "tiers.team.password = '********'" in message  # wrong type, value hidden
    assert "tiers.team.pasword = '********'" in message  # misspelt credential, hidden too
    assert "hunter2" not in message


@pytest.mark.parametrize(("word", "hint"), [("redis-cluster", "redis"), ("disk_v2", "disk"), ("polcy", "policy"),
                                            ("ssd", None), ("nvme", None)])
def test_did_you_mean_names_a_known_name_with_something_added(word: str, hint: str | None) -> None:
    """docs/configuration.md's example: 'redis-cluster' gets "(did you mean 'redis'?)"."""
    from kvortex_core.config.messages import closest

    assert closest(word, ["cpu", "disk", "memory", "redis", "s3", "policy"]) == hint
