"""``--device-pool``: every way to say it, and a message naming the setting for every way to get it wrong."""

from __future__ import annotations

import pytest

from storm_service.config import ConfigError, build_parser, load_config
from storm_service.device.backend import Link
from storm_service.device.spec import FAKE_PEER_GBPS, DeviceSpec, parse_device_pool

UUID = "GPU-8f6a1c52-3c1e-4c1a-9d7e-0a1b2c3d4e5f"


def test_cuda_and_fake_devices_parse_with_sizes_and_a_fake_rate():
    assert parse_device_pool(f"cuda:{UUID}=8GiB, fake:spare.0=512MiB@25") == (
        DeviceSpec("cuda", UUID, 8 << 30, FAKE_PEER_GBPS),
        DeviceSpec("fake", "spare.0", 512 << 20, 25.0),
    )
    assert parse_device_pool("") == ()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("cuda:0=1GiB", "not a GPU UUID"),
        ("cuda:GPU-xyz=1GiB", "CUDA_VISIBLE_DEVICES"),
        (f"cuda:{UUID}=1GiB@300", "measured"),
        ("fake:a/b=1GiB", "not a fake device's name"),
        ("fake:a=0", "positive"),
        ("fake:a=lots", "not a size"),
        ("fake:a=1GiB@fast", "not a rate"),
        ("fake:a=1GiB@-3", "positive"),
        ("fake:a=1GiB,fake:a=2GiB", "twice"),
        ("rocm:a=1GiB", "cuda:UUID=SIZE or fake:NAME=SIZE"),
        ("fake:a", "cuda:UUID=SIZE or fake:NAME=SIZE"),
    ],
)
def test_a_bad_device_pool_is_refused_with_the_reason(text, says):
    with pytest.raises(ValueError, match=says):
        parse_device_pool(text)
    with pytest.raises(ConfigError, match="--device-pool"):
        load_config(build_parser().parse_args(["--device-pool", text]), {})


def test_the_device_pool_comes_from_a_flag_the_environment_or_the_config_file(tmp_path):
    from_env = load_config(build_parser().parse_args([]), {"STORM_DEVICE_POOL": "fake:e=16MiB"})
    assert from_env.device_pool == (DeviceSpec("fake", "e", 16 << 20),)
    config_file = tmp_path / "stormd.toml"
    config_file.write_text('[stormd]\ndevice_pool = "fake:t=32MiB"\n')
    from_file = load_config(build_parser().parse_args(["--config", str(config_file)]), {})
    assert from_file.device_pool == (DeviceSpec("fake", "t", 32 << 20),)
    with pytest.raises(ConfigError, match="STORM_DEVICE_POOL"):
        load_config(build_parser().parse_args([]), {"STORM_DEVICE_POOL": "cuda:1=1GiB"})


@pytest.mark.parametrize(("peer", "host", "faster"), [(370, 50, True), (10, 25, False), (50, 50, False)])
def test_a_link_pays_only_where_the_device_is_faster_than_the_host_path(peer, host, faster):
    assert Link(peer, host, measured=True).faster is faster
