"""Helpers shared by the tests of launch/ (tests/conftest.py has put launch/ on sys.path)."""

import subprocess
from pathlib import Path

import pytest

from ds_grace.cluster.cluster_network import PREFIX, netns_unavailable_reason

LAUNCH_DIR = Path(__file__).resolve().parents[2] / "launch"

NETNS_UNAVAILABLE = netns_unavailable_reason()

requires_netns = pytest.mark.skipif(
    NETNS_UNAVAILABLE is not None, reason=f"emulated cluster unavailable: {NETNS_UNAVAILABLE}"
)


def namespaces_with_prefix(prefix: str = PREFIX) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def host_links_with_prefix(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if prefix in line]
