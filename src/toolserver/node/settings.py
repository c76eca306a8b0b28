"""Node configuration: defaults < YAML file (``--config``) < ``TOOLSERVER_NODE_*`` environment.

The workspace given on the command line wins over everything. Unknown keys are refused, so a typo
stops the node with a message naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import SettingsConfigDict

from toolserver.config import EnvOverYamlSettings, describe_validation_error, read_yaml_mapping
from toolserver.errors import ConfigError

DEFAULT_IGNORE = [".git", "__pycache__", "*.pyc", ".ipynb_checkpoints", "node_modules", ".venv", ".DS_Store"]


class NodeConfig(EnvOverYamlSettings):
    """Everything a node can be told. Each field is also ``TOOLSERVER_NODE_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="TOOLSERVER_NODE_", extra="forbid", validate_default=False)

    workspace: Path = Field(Path("workspace"), description="the only directory tools write to")
    state_dir: Path | None = Field(
        None, description="node state (registered tools, temp files); default: '<workspace>.state' beside it"
    )
    secret: SecretStr | None = Field(
        None, description="when set, every request but GET /health must carry it"
    )
    # tools
    extensions: list[str] = Field(
        default_factory=list, description="extra tool modules: dotted names or .py paths"
    )
    allow_register_tool: bool = Field(False, description="enable POST /register_new_tool (runs posted code!)")
    tool_timeout: float = Field(
        900.0, gt=0, description="seconds any tool call may take before it is stopped"
    )
    max_output_chars: int = Field(20_000, ge=1_000, description="cap of the text a tool returns")
    ignore_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE))
    max_entries_per_level: int = Field(50, ge=1, description="print_filesys_struture: entries shown per dir")
    # shell
    shell_executable: str = "/bin/bash"
    shell_timeout: float = Field(60.0, gt=0, description="seconds a foreground command may run")
    command_buffer_chars: int = Field(
        1_000_000, ge=1_000, description="/commands: output kept per command for reattaching"
    )
    command_keepalive_seconds: float = Field(
        15.0, gt=0, description="/commands streams: a keepalive line after this long without output"
    )
    max_terminals: int = Field(8, ge=1, description="interactive terminals open at once")
    # notebook
    notebook_file: str = "notebook.ipynb"
    notebook_timeout: float = Field(120.0, gt=0, description="seconds a cell may run before an interrupt")
    kernel_name: str = "python3"
    kernel_start_timeout: float = Field(60.0, gt=0)
    # web
    web_timeout: float = Field(20.0, gt=0)
    web_max_bytes: int = Field(5_000_000, ge=1_000, description="largest page browse_website downloads")
    web_user_agent: str = "Mozilla/5.0 (compatible; ToolServer/0.1)"
    web_search_provider: Literal["bing", "searxng"] = "bing"
    web_search_url: str | None = Field(None, description="search API endpoint; search_and_browse needs it")
    web_search_api_key: SecretStr | None = None
    offline: str | None = Field(
        None,
        description="why the node has no network but loopback (set by its runtime); the web tools say it",
    )
    # retrieval
    embedding_url: str | None = Field(None, description="OpenAI-compatible /embeddings URL (optional)")
    embedding_model: str = "text-embedding-3-small"
    embedding_api_key: SecretStr | None = None
    # HTTP limits
    upload_max_bytes: int = Field(1 << 30, ge=1, description="largest upload accepted (413 above)")
    request_max_bytes: int = Field(32 << 20, ge=1024, description="largest JSON request body")
    workspace_tree_max_entries: int = Field(10_000, ge=1, description="cap of /get_workspace_structure")

    @property
    def resolved_state_dir(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir.expanduser().absolute()
        ws = self.workspace.expanduser().absolute()
        if not ws.name:  # the workspace is '/': nowhere beside it
            return Path("/var/tmp/toolserver-node.state")
        return ws.with_name(ws.name + ".state")


def load_node_config(path: str | Path | None = None, **overrides: Any) -> NodeConfig:
    """Read the YAML file ``path`` (optional), apply the environment, then ``overrides``."""
    data = read_yaml_mapping(path, "node config file") if path is not None else {}
    try:
        config = NodeConfig(**data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    unknown = set(overrides) - set(NodeConfig.model_fields)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)}")
    # explicit (command line) values win over the environment too
    return config.model_copy(update=overrides)
