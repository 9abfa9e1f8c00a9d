"""Security defaults: the embedded Ray listens on loopback only; updates are never unpickled."""

import ipaddress
import os
from pathlib import Path

import numpy as np
import pytest
import ray

from fedray.update import Update

pytestmark = pytest.mark.usefixtures("ray_session")


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _listening_addresses(pids: set[int]) -> list[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    addresses = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                # /proc prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
                addresses.append(str(ipaddress.ip_address(words)))
    return addresses


def test_embedded_ray_listens_on_loopback_only():
    @ray.remote
    def ping():
        return os.getpid()

    ray.get(ping.remote())
    addresses = _listening_addresses(_descendants(os.getpid()))
    assert len(addresses) >= 3  # gcs, raylet, workers ...
    for a in addresses:
        ip = ipaddress.ip_address(a)
        ip = getattr(ip, "ipv4_mapped", None) or ip
        assert ip.is_loopback, f"a Ray process listens on {a}"


def test_update_payload_is_not_pickle():
    payload = Update(1, 1, 5, 1, 0.1, np.zeros(3, np.float32)).to_bytes()
    assert b"\x80\x05" not in payload[:2]  # not a pickle stream
    import pickle

    with pytest.raises(ValueError, match="malformed"):
        Update.from_bytes(pickle.dumps({"device_id": 1}))
