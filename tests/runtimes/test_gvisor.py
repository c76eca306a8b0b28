"""The gvisor tier: its config model, its preflight, and a real node under runsc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from toolserver.errors import ConfigError
from toolserver.runtimes import validate_config
from toolserver.runtimes.base import LABEL_MANAGER, NodeSpec, RuntimeContext
from toolserver.runtimes.gvisor import GVisorConfig, GVisorRuntime
from toolserver.testing.tiers import GVISOR

from .conftest import SESSION, TEST_LABEL, exec_in, remove_labelled
from .test_docker_hardening import started_healthy


def test_config_is_tagged_and_refuses_another_container_runtime() -> None:
    config = validate_config("gvisor", {"image": "x:1"})
    assert isinstance(config, GVisorConfig) and config.type == "gvisor" and config.runsc_runtime == "runsc"
    with pytest.raises(ConfigError, match=r"runtime_config\.imagee"):
        validate_config("gvisor", {"imagee": "x:1"})
    with pytest.raises(ConfigError, match="always runs 'runsc'"):
        validate_config("gvisor", {"creation_kwargs": {"runtime": "runc"}})


def test_nodes_are_created_with_runsc(tmp_path: Path) -> None:
    rt = GVisorRuntime(validate_config("gvisor", {}), RuntimeContext(tmp_path, "m1"))
    body = rt.template.container_body(NodeSpec(node_id="n1", manager_id="m1", secret="s"))
    assert body["HostConfig"]["Runtime"] == "runsc"
    assert body["HostConfig"]["CapDrop"] == ["ALL"]


@pytest.mark.docker
async def test_preflight_names_what_is_missing_and_the_tier_that_works(
    docker_available: None, tmp_path: Path
) -> None:
    config = validate_config("gvisor", {"runsc_runtime": "no-such-runsc"})
    rt = GVisorRuntime(config, RuntimeContext(tmp_path, "m1"))
    try:
        with pytest.raises(ConfigError) as refused:
            await rt.preflight()
    finally:
        await rt.aclose()
    message = str(refused.value)
    assert "'no-such-runsc' runtime in dockerd" in message and "isolation: docker" in message
    assert "runc" in message  # what dockerd has


@pytest.mark.docker
async def test_uname_inside_shows_gvisors_kernel(docker_available: None, tmp_path: Path, docker) -> None:
    reason = GVISOR.unavailable()
    if reason:
        pytest.skip(reason)
    rt = GVisorRuntime(
        validate_config(
            "gvisor", {**GVISOR.runtime_config, "creation_kwargs": {"labels": {TEST_LABEL: SESSION}}}
        ),
        RuntimeContext(tmp_path, f"pytest-gv-{tmp_path.name[-8:]}"),
    )
    await rt.preflight()
    try:
        info = await started_healthy(rt, rt.context.manager_id)
        code, out = await exec_in(
            docker, info.state["container_id"], ["sh", "-c", "uname -a; dmesg 2>&1 | head -3"]
        )
        assert code == 0, out
        host_release = os.uname().release
        assert host_release not in out.splitlines()[0], out  # not the host's kernel
        assert "gvisor" in out.lower() or "4.4.0" in out, (
            out
        )  # runsc reports Linux 4.4.0; its dmesg says gVisor
    finally:
        await rt.aclose()
        await remove_labelled(docker, f"{LABEL_MANAGER}={rt.context.manager_id}")
