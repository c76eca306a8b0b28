"""The runtime registry: built-ins by entry point, a third-party runtime as one installed package.

The third-party package is real as far as Python's packaging goes: a module plus a
``.dist-info`` directory (METADATA, entry_points.txt) on the path, which is what ``pip install``
leaves behind. Its runtime is the process runtime with a config key of its own, so it runs real
nodes; it passes the conformance kit and serves a session of a real manager.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import ManagerProcess, config_refusal
from toolserver.client import ToolServerClient
from toolserver.errors import ConfigError
from toolserver.runtimes import runtime_class, runtime_names, validate_config
from toolserver.runtimes.docker import DockerConfig, DockerRuntime
from toolserver.runtimes.process import ProcessRuntime
from toolserver.testing.conformance import RuntimeConformance
from toolserver.testing.tiers import PROCESS, Tier

RUNTIME_MODULE = '''
from typing import Literal

from toolserver.runtimes.base import RuntimeConfig, RuntimeContext
from toolserver.runtimes.process import ProcessRuntime


class GreetingConfig(RuntimeConfig):
    type: Literal["greeting"] = "greeting"
    greeting: str


class GreetingRuntime(ProcessRuntime):
    """Local processes that find their greeting in the environment."""

    name = "greeting"
    config_model = GreetingConfig

    def __init__(self, config: GreetingConfig, context: RuntimeContext) -> None:
        super().__init__(config, context)
        self.extra_env["GREETING"] = config.greeting
'''


@pytest.fixture(scope="module")
def third_party(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A package ``greeting-runtime`` declaring the runtime ``greeting``, on sys.path and PYTHONPATH."""
    site = tmp_path_factory.mktemp("site")
    (site / "greeting_runtime.py").write_text(RUNTIME_MODULE)
    info = site / "greeting_runtime-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: greeting-runtime\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[toolserver.runtimes]\ngreeting = greeting_runtime:GreetingRuntime\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
        yield site


def test_the_built_ins_are_registered() -> None:
    assert {"process", "docker"} <= set(runtime_names())
    assert runtime_class("process") is ProcessRuntime
    assert runtime_class("docker") is DockerRuntime
    assert runtime_class("docker").config_model is DockerConfig


def test_an_unknown_name_lists_the_registered_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown runtime 'kubernetes'; the registered runtimes are .*docker"
    ):
        runtime_class("kubernetes")


def test_a_third_party_runtime_is_found_and_its_config_validated(third_party: Path) -> None:
    assert "greeting" in runtime_names()
    config = validate_config("greeting", {"greeting": "hello"})
    assert type(config).__name__ == "GreetingConfig" and config.type == "greeting"
    with pytest.raises(ConfigError, match=r"unknown key 'runtime_config\.greetin'"):
        validate_config("greeting", {"greeting": "hello", "greetin": "typo"})
    with pytest.raises(ConfigError, match=r"'runtime_config\.greeting': Field required"):
        validate_config("greeting", {})


def test_a_third_party_runtime_serves_a_manager(
    third_party: Path, manager_factory: Callable[..., ManagerProcess]
) -> None:
    manager = manager_factory(isolation="greeting", runtime_config={"greeting": "hello from a package"})
    with ToolServerClient(manager.url) as client, client.session() as session:
        out = session.execute_tool("shell_command_executor", {"command": "printenv GREETING"})
        assert "hello from a package" in str(out)
        assert manager.node(session.node_id)["runtime"] == "greeting"


def test_a_bad_key_of_a_third_party_runtime_stops_the_manager(third_party: Path, tmp_path: Path) -> None:
    path = tmp_path / "manager.yml"
    path.write_text("isolation: greeting\nruntime_config:\n  greeting: hi\n  colour: red\n")
    proc = config_refusal(path)
    assert proc.returncode == 2
    assert "unknown key 'runtime_config.colour'" in proc.stderr


class TestThirdPartyConformance(RuntimeConformance):
    """The conformance kit as a runtime author uses it, on the third-party runtime."""

    @pytest.fixture
    def tier(self, third_party: Path) -> Tier:
        return Tier("greeting", runtime_config={"greeting": "hi"}, leftovers=PROCESS.leftovers)
