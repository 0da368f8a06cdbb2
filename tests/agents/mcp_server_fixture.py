"""A tiny MCP server over stdio for tests/agents/test_mcp.py, run as `python mcp_server_fixture.py`.

Tools: add (read-only), echo (idempotent), fail (raises), slow (sleeps), pid (the server's
process id, so a test can check that closing reaped it), blob (text and an image part).
Written against the SDK's decorator server: MCPServer in mcp 2.x, FastMCP in mcp 1.x.
"""

from __future__ import annotations

import asyncio
import os
import sys

try:  # mcp >= 2
    from mcp.server.mcpserver import MCPServer as Server
    from mcp.server.mcpserver.exceptions import ToolError
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as Server
    from mcp.server.fastmcp.exceptions import ToolError
from mcp.types import ImageContent, TextContent, ToolAnnotations

server = Server("metroline-test", log_level="ERROR")


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool(annotations=ToolAnnotations(readOnlyHint=False, idempotentHint=True))
def echo(text: str, times: int = 1) -> str:
    """Repeat a text."""
    return " ".join([text] * times)


@server.tool()
def fail(message: str) -> str:
    """Always raises (the SDK's ToolError: its message reaches the client)."""
    raise ToolError(f"boom: {message}")


@server.tool()
async def slow(seconds: float) -> str:
    """Sleep, then answer."""
    await asyncio.sleep(seconds)
    return f"slept {seconds}"


@server.tool()
def pid() -> int:
    """This server's process id."""
    return os.getpid()


@server.tool()
def blob() -> list:
    """A text part and an image part."""
    return [TextContent(type="text", text="caption"),
            ImageContent(type="image", data="iVBORw0KGgo=", mimeType="image/png")]


if __name__ == "__main__":
    if "--crash" in sys.argv:  # a server that fails before speaking the protocol
        print("fixture: refusing to start (--crash)", file=sys.stderr, flush=True)
        sys.exit(3)
    server.run()
