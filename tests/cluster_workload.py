"""Cluster test helpers: the requests both the Ray cluster and one `llm-serve run` answer, and loopback checks.

Imported by tests/test_cluster.py (outside the network namespace) and tests/cluster_driver.py (inside it).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path

WORKERS = "/ai/run/@cf/meta/llama-2-7b-chat-fp16"
REST = "/client/v4/accounts/0123abcd/ai/run/@cf/meta/llama-2-7b-chat-fp16"
GREEDY = {"temperature": 0, "max_tokens": 12}
LONG = {"temperature": 0, "max_tokens": 2900, "stream": True}  # the demo model never stops early: ~2900 steps


def greedy_requests() -> list[tuple[str, dict]]:
    """24 (path, body) over both API families, streamed and not, every one greedy."""
    jobs: list[tuple[str, dict]] = []
    for n in range(6):
        jobs.append((WORKERS, {"prompt": f"Question {n}: what do llamas eat?", **GREEDY, "stream": n % 2 == 1}))
    for n in range(6):
        messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"Count to {n}"}]
        jobs.append((REST, {"messages": messages, **GREEDY, "stream": n % 2 == 1}))
    for n in range(6):
        jobs.append(("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": f"Hi {n}"}],
                                              **GREEDY, "stream": n % 2 == 1}))
    for n in range(6):
        jobs.append(("/v1/completions", {"model": "demo", "prompt": f"Once upon a time {n}", **GREEDY,
                                         "stream": n % 2 == 1}))
    return jobs


def comparable(path: str, raw: bytes) -> bytes:
    """The body with what differs by design between two servers blanked: OpenAI's response ids and
    creation times (random / the clock). Everything else must match byte for byte."""
    if not path.startswith("/v1/"):
        return raw

    def blank(line: bytes) -> bytes:
        prefix = b"data: " if line.startswith(b"data: {") else b""
        text = line[len(prefix):]
        if not text.startswith(b"{"):
            return line
        payload = json.loads(text)
        payload.update({key: "-" for key in ("id", "created") if key in payload})
        return prefix + json.dumps(payload, sort_keys=True).encode()

    return b"\n".join(blank(line) for line in raw.split(b"\n"))


def loopback_command(argv: list[str], repo: Path) -> tuple[list[str] | None, str]:
    """`argv` inside a network namespace that has only loopback: ../shared/tools/loopback-netns, else
    `unshare --net` directly; (None, why) when neither can make one here (not root, no unshare)."""
    tool = repo.parent / "shared" / "tools" / "loopback-netns"
    candidates = []
    if tool.is_file():
        candidates.append([str(tool)])
    if shutil.which("unshare"):
        candidates.append(["unshare", "--net", "--fork", "bash", "-c", 'ip link set lo up && exec "$@"', "netns"])
    reasons = []
    for prefix in candidates:
        probe = subprocess.run([*prefix, "cat", "/proc/net/dev"], check=False, capture_output=True, text=True,
                               timeout=30)
        if probe.returncode == 0 and interfaces(probe.stdout) == ["lo"]:
            return [*prefix, *argv], ""
        reasons.append(f"{prefix[0]}: {probe.stderr.strip() or probe.stdout.strip()}")
    return None, "no loopback-only network namespace can be made here (root and unshare needed): " + \
        ("; ".join(reasons) or "neither ../shared/tools/loopback-netns nor unshare exists")


def interfaces(proc_net_dev: str | None = None) -> list[str]:
    """The network interfaces of this namespace (/proc/net/dev is per namespace; /sys/class/net is not)."""
    text = proc_net_dev if proc_net_dev is not None else Path("/proc/net/dev").read_text()
    return sorted(line.split(":")[0].strip() for line in text.splitlines()[2:] if ":" in line)


def inet_sockets() -> list[dict]:
    """Every TCP/UDP socket of this network namespace (all its processes): /proc/net, no psutil."""
    found = []
    for kind in ("tcp", "tcp6", "udp", "udp6"):
        path = f"/proc/net/{kind}"
        if not os.path.exists(path):
            continue
        for line in Path(path).read_text().splitlines()[1:]:
            fields = line.split()
            found.append({"kind": kind, "local": _address(fields[1]), "remote": _address(fields[2]),
                          "state": fields[3]})
    return found


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(raw[::-1])
    else:  # /proc prints IPv6 as four little-endian 32-bit words
        ip = ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return f"{ip}:{int(port, 16)}"


def off_loopback(sockets: list[dict]) -> list[dict]:
    """Sockets bound to or talking to anything but loopback (a wildcard listener or an unconnected remote
    is fine: in a loopback-only namespace it reaches loopback only)."""
    bad = []
    for sock in sockets:
        for end in ("local", "remote"):
            ip = ipaddress.ip_address(sock[end].rsplit(":", 1)[0])
            if getattr(ip, "ipv4_mapped", None):
                ip = ip.ipv4_mapped
            if not (ip.is_loopback or ip.is_unspecified):
                bad.append(sock)
    return bad
