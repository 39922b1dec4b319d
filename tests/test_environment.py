"""The locked environment agrees with the declared one: every locked version satisfies the ranges
of pyproject.toml and environment.yml, and every declared package is locked."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def locked() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            out[norm(name)] = Version(version)
    return out


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_declared_dependency_is_locked_within_its_range():
    lock = locked()
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(meta["dependencies"]) + [r for extra in meta["optional-dependencies"].values() for r in extra]
    for spec in declared:
        req = Requirement(spec)
        name = norm(req.name)
        if name == "torch":
            continue  # installed from TORCH_SPEC (a CPU or CUDA build), not from the lock
        assert name in lock, f"{req.name} is declared but not in requirements/lock.txt (run scripts/lock)"
        assert req.specifier.contains(lock[name], prereleases=True), f"{req.name}: locked {lock[name]} not in {req}"


def test_environment_yml_ranges_contain_the_locked_versions():
    lock = locked()
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_names = {"pytorch": "torch", "matplotlib-base": "matplotlib"}
    for dep in env["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            if item.startswith("-") or item.split(">")[0].split("=")[0].split("<")[0] in ("python", "pip"):
                continue
            req = Requirement(item.replace(" ", ""))
            name = norm(conda_names.get(req.name, req.name))
            if name == "torch":
                continue
            assert name in lock, f"environment.yml names {req.name}, which is not locked"
            assert req.specifier.contains(lock[name], prereleases=True), f"{req.name}: {lock[name]} not in {req}"
