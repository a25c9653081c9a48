"""Drives `mvm mcp` with the official Python MCP client (the `mcp` package, pinned in
requirements.txt beside this file; scripts/setup installs it): lists the tools, calls each
one, and sends it what a careless agent would. Exits 0 and prints PASS, or fails with a
message on stderr and exit 1.

    python client.py /path/to/mvm
"""

import asyncio
import os
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def field(obj, *names):
    for name in names:
        if hasattr(obj, name):
            return getattr(obj, name)
    return None


def check(ok, what):
    if not ok:
        raise SystemExit(f"FAIL mcp client: {what}")


async def main(mvm):
    params = StdioServerParameters(command=mvm, args=["mcp"], env=dict(os.environ))
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            info = field(init, "serverInfo", "server_info")
            check(info is not None and info.name == "mvm", f"server info {info!r}")

            listed = await session.list_tools()
            names = sorted(t.name for t in listed.tools)
            check(names == ["host_info", "run_command"], f"tools {names}")

            # A command with stdin, output on both streams and its own exit code.
            result = await session.call_tool(
                "run_command",
                {
                    "command": ["sh", "-c", "cat; echo; echo to-stderr >&2; exit 4"],
                    "stdin": "hello from the client",
                    "env": {"GREETING": "hi"},
                },
            )
            check(not field(result, "isError", "is_error"), f"run_command failed: {result}")
            out = field(result, "structuredContent", "structured_content")
            check(out is not None, f"no structured content: {result}")
            check(out["exit_code"] == 4, f"exit code {out['exit_code']}")
            check(out["stdout"] == "hello from the client\n", f"stdout {out['stdout']!r}")
            check(out["stderr"] == "to-stderr\n", f"stderr {out['stderr']!r}")
            check(out["tier"] in ("kvm", "emulated"), f"tier {out['tier']!r}")

            env = await session.call_tool(
                "run_command", {"command": ["sh", "-c", "echo $GREETING"], "env": {"GREETING": "hi"}}
            )
            check(field(env, "structuredContent", "structured_content")["stdout"] == "hi\n", f"env: {env}")

            info = await session.call_tool("host_info", {})
            walls = field(info, "structuredContent", "structured_content")["walls"]
            check(sorted(w["backend"] for w in walls) == ["container", "emulated", "kvm", "vz"], f"walls {walls}")

            # Bad arguments are a tool error the agent can read, not a crash.
            bad = await session.call_tool("run_command", {"command": []})
            check(field(bad, "isError", "is_error"), f"an empty command was not an error: {bad}")

            # An unknown tool is a protocol error; the server goes on.
            try:
                unknown = await session.call_tool("format_disk", {})
                check(field(unknown, "isError", "is_error"), f"an unknown tool did not fail: {unknown}")
            except Exception:
                pass
            await session.send_ping()
    print("PASS mcp client: run_command, host_info, bad arguments, unknown tool")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: client.py MVM")
    asyncio.run(main(sys.argv[1]))
