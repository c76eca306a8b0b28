"""Builtin tools. Each module only imports the standard library at load time; heavy libraries load on use."""

#: Modules the node loads at startup, in order.
BUILTIN_MODULES = [
    "toolserver.node.tools.filesystem",
    "toolserver.node.tools.shell",
    "toolserver.node.tools.notebook",
    "toolserver.node.tools.web",
    "toolserver.node.tools.calculator",
]
