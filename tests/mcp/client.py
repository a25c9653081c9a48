"""Drives `mvm mcp` with the official Python MCP client (the `mcp` package, pinned in
requirements.txt beside this file; scripts/setup installs it): lists the tools, calls each
one (the sandbox tools against one real, long-lived sandbox), and sends it what a careless
agent would. Exits 0 and prints PASS, or fails with a
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
            want = sorted([
                "host_info", "run_command", "sandbox_create", "sandbox_exec",
                "sandbox_list", "sandbox_read_file", "sandbox_stop", "sandbox_write_file",
            ])
            check(names == want, f"tools {names}")

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
            await sandbox_tools(session)
    print("PASS mcp client: run_command, host_info, sandbox tools, bad arguments, unknown tool")


def structured(result):
    check(not field(result, "isError", "is_error"), f"tool failed: {result}")
    out = field(result, "structuredContent", "structured_content")
    check(out is not None, f"no structured content: {result}")
    return out


async def sandbox_tools(session):
    """Every sandbox tool against one real sandbox: state carries across calls."""
    created = structured(await session.call_tool("sandbox_create", {"name": "mcp-test", "ttl_secs": 600}))
    sid = created["id"]
    check(created["status"] == "ready" and sid.startswith("sb-"), f"created {created}")
    try:
        script = 'n=$(wc -l < /work/in.txt)\necho "{\\"lines\\": $n}" > /work/out.json\n'
        wrote = structured(await session.call_tool(
            "sandbox_write_file", {"sandbox": "mcp-test", "path": "/work/count.sh", "content": script}))
        check(wrote["size"] == len(script.encode()), f"write_file {wrote}")
        structured(await session.call_tool(
            "sandbox_write_file",
            {"sandbox": sid, "path": "/work/in.txt", "content_base64": "YQpiCg=="}))  # "a\nb\n"
        ran = structured(await session.call_tool(
            "sandbox_exec", {"sandbox": sid, "command": ["sh", "/work/count.sh"]}))
        check(ran["exit_code"] == 0, f"exec {ran}")
        read = structured(await session.call_tool(
            "sandbox_read_file", {"sandbox": sid, "path": "/work/out.json"}))
        check(read["encoding"] == "utf-8" and read["content"] == '{"lines": 2}\n', f"read_file {read}")
        # A process's output and status, with stdin, in the same sandbox.
        piped = structured(await session.call_tool(
            "sandbox_exec",
            {"sandbox": sid, "command": ["sh", "-c", "cat; cat /work/in.txt >&2; exit 3"], "stdin": "x"}))
        check((piped["exit_code"], piped["stdout"], piped["stderr"]) == (3, "x", "a\nb\n"), f"exec {piped}")
        listed = structured(await session.call_tool("sandbox_list", {}))
        check(any(s["id"] == sid and s["status"] == "ready" for s in listed["sandboxes"]), f"list {listed}")
        # Mistakes are tool errors, and the sandbox goes on.
        for bad in [
            ("sandbox_exec", {"sandbox": "no-such-sandbox", "command": ["true"]}),
            ("sandbox_write_file", {"sandbox": sid, "path": "/work/../etc/x", "content": "x"}),
            ("sandbox_read_file", {"sandbox": sid, "path": "/work/missing"}),
            ("sandbox_exec", {"sandbox": sid, "command": "not a list"}),
            ("sandbox_create", {"name": "mcp-test"}),
        ]:
            result = await session.call_tool(*bad)
            check(field(result, "isError", "is_error"), f"{bad} was not an error: {result}")
    finally:
        stopped = structured(await session.call_tool("sandbox_stop", {"sandbox": sid}))
    check(stopped["status"] == "stopped", f"stop {stopped}")
    after = await session.call_tool("sandbox_exec", {"sandbox": sid, "command": ["true"]})
    check(field(after, "isError", "is_error"), f"exec after stop was not an error: {after}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: client.py MVM")
    asyncio.run(main(sys.argv[1]))
