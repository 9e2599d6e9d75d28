"""The listening TCP sockets of a process tree, read from ``/proc`` (Linux; no psutil).

A socket belongs to a process when one of its ``/proc/PID/fd`` links names the socket's
inode; the tree is the process and every descendant, found through ``/proc/PID/stat``'s
parent field. ``python -m tests.integration._sockets PID`` prints the table.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Listener", "process_tree", "listeners", "exposed"]

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column
LOOPBACK = ("127.0.0.1", "::1")


@dataclass(frozen=True, order=True)
class Listener:
    host: str
    port: int
    pid: int
    process: str

    @property
    def loopback(self) -> bool:
        address = ipaddress.ip_address(self.host)
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack bind
        return (mapped or address).is_loopback


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return int(stat.rsplit(")", 1)[1].split()[1])


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _parent(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _address(hex_ip: str) -> str:
    raw = bytes.fromhex(hex_ip)
    # The kernel prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    mapped = getattr(address, "ipv4_mapped", None)
    return f"::ffff:{mapped}" if mapped else str(address)


def _listening_inodes() -> dict[int, tuple[str, int]]:
    found: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != _LISTEN:
                continue
            ip, port = fields[1].split(":")
            found[int(fields[9])] = (_address(ip), int(port, 16))
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()[-40:] \
            or Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def listeners(root: int) -> list[Listener]:
    """Every listening TCP socket held by ``root``'s process tree."""
    listening = _listening_inodes()
    out = set()
    for pid in process_tree(root):
        for inode in _socket_inodes(pid) & listening.keys():
            host, port = listening[inode]
            out.add(Listener(host, port, pid, _name(pid)))
    return sorted(out)


def exposed(root: int, allowed: set[int] = frozenset()) -> list[Listener]:
    """The tree's listeners bound beyond loopback, except on the ports in ``allowed``."""
    return [s for s in listeners(root) if not s.loopback and s.port not in allowed]


if __name__ == "__main__":
    for s in listeners(int(sys.argv[1])):
        print(f"{s.host:>16} {s.port:>6}  {s.process}")
