"""What the GPU check machine lacks, from this interpreter's installed distributions.

    python benchmarks/gpu/carry.py requirements WHEEL [--python-version 3.12]
        name==version per line: every distribution that ds_grace (its built WHEEL's requirements) needs,
        directly or through another carried one, and that machine_packages.txt does not list, at the
        version installed here; plus typing-extensions (there, but of unknown version; pydantic-core
        needs a recent one). torch is never carried: the machine's CUDA build stays.
    python benchmarks/gpu/carry.py machine-view DIR
        DIR: symlinks to this interpreter's installed packages that the GPU machine has too, and to
        nothing else. `python -S` with DIR on PYTHONPATH imports like that machine (the CPU rehearsal).

Errors print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

MACHINE_PACKAGES = Path(__file__).with_name("machine_packages.txt")
ALWAYS_CARRY = ("typing-extensions",)
NEVER_CARRY = frozenset({"torch"})


class CarryError(ValueError):
    pass


def machine_packages(path: Path = MACHINE_PACKAGES) -> frozenset[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return frozenset(canonicalize_name(line) for line in lines if line and not line.startswith("#"))


def wheel_requirements(wheel: Path) -> list[str]:
    """Requires-Dist of a built wheel (its METADATA)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
        if name is None:
            raise CarryError(f"wheel ({wheel}) has no .dist-info/METADATA")
        metadata = Parser().parsestr(archive.read(name).decode())
    return metadata.get_all("Requires-Dist") or []


def _applies(requirement: Requirement, environment: dict[str, str]) -> bool:
    return requirement.marker is None or requirement.marker.evaluate({**environment, "extra": ""})


def carried(root_requirements: list[str], *, python_version: str) -> list[tuple[str, str]]:
    """(name, version installed here) of every distribution to carry, sorted by name."""
    environment = {**default_environment(), "python_version": python_version,
                   "python_full_version": f"{python_version}.0"}  # fmt: skip
    present = machine_packages()
    found: dict[str, str] = {}
    pending = list(root_requirements)
    while pending:
        requirement = Requirement(pending.pop())
        key = canonicalize_name(requirement.name)
        if not _applies(requirement, environment) or key in present or key in NEVER_CARRY or key in found:
            continue
        try:
            distribution = importlib.metadata.distribution(key)
        except importlib.metadata.PackageNotFoundError:
            raise CarryError(
                f"{requirement} is needed but not installed here, so its version is unknown"
            ) from None
        if not requirement.specifier.contains(distribution.version, prereleases=True):
            raise CarryError(f"{requirement} is needed but {key} {distribution.version} is installed here")
        found[key] = distribution.version
        pending += distribution.requires or []
    for name in ALWAYS_CARRY:
        found.setdefault(name, importlib.metadata.version(name))
    return sorted(found.items())


def machine_view(target: Path) -> int:
    """Symlink into `target` every top-level entry (packages, modules, .dist-info, .libs) of the installed
    distributions that the GPU machine has; returns how many were linked."""
    present = machine_packages()
    target.mkdir(parents=True, exist_ok=True)
    linked = 0
    for distribution in importlib.metadata.distributions():
        if canonicalize_name(distribution.metadata["Name"] or "") not in present:
            continue
        base = Path(str(distribution.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in distribution.files or [] if not str(f).startswith("..")}
        for top in sorted(tops):
            source, link = base / top, target / top
            if source.exists() and not link.exists() and not link.is_symlink():
                link.symlink_to(source)
                linked += 1
    return linked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    requirements = commands.add_parser("requirements")
    requirements.add_argument("wheel", type=Path, help="ds_grace's built wheel")
    requirements.add_argument("--python-version", default=".".join(platform.python_version_tuple()[:2]))
    view = commands.add_parser("machine-view")
    view.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "requirements":
            for name, version in carried(wheel_requirements(args.wheel), python_version=args.python_version):
                print(f"{name}=={version}")
        else:
            print(f"linked {machine_view(args.dir)} entries into {args.dir}", file=sys.stderr)
    except (CarryError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
