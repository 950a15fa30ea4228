"""Where a case ran: device name, library versions, git revision, host.

Device, versions and host are collected in the worker that ran the case (on a cluster that may
be another machine); the git revision is the driver's checkout, the code it shipped.
"""

from __future__ import annotations

import platform
import socket
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def host_name() -> str:
    return socket.gethostname()


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux), else whatever ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(gpu: bool) -> str:
    """The CUDA device's name when ``gpu`` and torch sees one, else ``cpu: <model>``."""
    if gpu:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"cpu: {cpu_name()}"


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """``torch``, ``triton``, ``nsa``, ``python`` versions ("" for a missing package), read from
    package metadata so that a fresh worker need not import torch to say which one it has."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "triton", "nsa"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = ""
    return versions


@lru_cache(maxsize=4)
def git_sha(repo: Path = REPO_ROOT) -> str:
    """``HEAD`` of the checkout ``repo`` (``-dirty`` appended with uncommitted changes to tracked
    files), or ``""`` when it is not a git checkout or git is missing."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return ""
    return sha + ("-dirty" if dirty else "")
