"""The shared fixtures themselves work: registry up, image built by umoci, pushed by skopeo."""

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from conftest import Registry, User, make_busybox_rootfs, make_oci_image


@pytest.mark.registry
def test_registry_serves_umoci_image(registry: Registry, world_tmp: Path) -> None:
    def base(rootfs: Path) -> None:
        make_busybox_rootfs(rootfs)

    layout = make_oci_image(world_tmp / "layout", "v1", [base])
    ref = registry.push_oci(layout, "v1", "smoke/busybox")
    with urllib.request.urlopen(registry.url("/v2/smoke/busybox/tags/list")) as resp:
        assert json.load(resp)["tags"] == ["v1"]
    assert ref.endswith("smoke/busybox:v1")


def test_user_is_unprivileged(user: User) -> None:
    out = subprocess.run(["id", "-u", user.name], capture_output=True, text=True, check=True).stdout
    assert int(out) == user.uid != 0
    res = user.run(["id", "-u"])
    assert res.returncode == 0 and int(res.stdout) == user.uid
