"""Build the wheelhouse that lets plwlab run on the GPU machines' image (Python 3.12, torch 2.11 + CUDA 13, no
hydra-core, omegaconf, submitit, lm-eval or wandb; nothing can be fetched there): every package plwlab's
dependencies resolve to for CPython 3.12 on manylinux x86-64, less those the image has (tools/gpu_image.txt, whose
versions pin the resolution). antlr4-python3-runtime (omegaconf's parser) and three of lm-eval's needs are
published as sdists only: they are built into wheels here. Checks that each name comes once and that the whole is within --max-mib.

    python tools/gpu_wheelhouse.py [--out .whl] [--max-mib 60]       (make gpu-wheelhouse)

On the GPU machine (tools/gpu_check.sh does this): pip install --no-index --no-deps --target /tmp/site .whl/*.whl
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
# the image is Ubuntu 24.04 (glibc 2.39); pip matches each manylinux_2_N tag exactly
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--only-binary=:all:"]
TARGET += [arg for p in PLATFORMS for arg in ("--platform", p)]
# published as sdists only (pure Python): built into wheels here. omegaconf 2.3 needs antlr4 4.9.*; lm-eval the rest
SDIST_ONLY = ["antlr4-python3-runtime==4.9.3", "sqlitedict==2.1.0", "rouge-score==0.1.2", "word2number==1.1"]


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = ROOT / "tools" / "gpu_image.txt") -> dict[str, str | None]:
    """Name -> version (None where the image's version is not known) of each package the GPU image holds."""
    packages: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        for item in line.split("#")[0].split():
            name, _, version = item.partition("==")
            packages[normalize(name)] = version or None
    return packages


def plwlab_requirements() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-qq", *args], check=True)


def resolve(requirements: list[str], image: dict[str, str | None], links: Path, tmp: Path) -> dict[str, str]:
    """Name -> version of everything ``requirements`` need on the GPU image's Python, resolved by pip against
    PyPI (metadata only), with the image's known versions as constraints."""
    constraints = tmp / "image-constraints.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in image.items() if v))
    report = tmp / "report.json"
    pip("install", "--dry-run", "--ignore-installed", "--ignore-requires-python", "--report", str(report), "--target", str(tmp / "t"),
        *TARGET, "--find-links", str(links), "-c", str(constraints), *requirements)  # fmt: skip
    items = json.loads(report.read_text())["install"]
    return {normalize(i["metadata"]["name"]): i["metadata"]["version"] for i in items}


def build(out: Path, max_mib: float) -> list[Path]:
    """Fill ``out`` with the wheels; returns them. Raises SystemExit with one line when a check fails."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    image = image_packages()
    with tempfile.TemporaryDirectory() as tmp:
        pip("wheel", "--no-deps", "--no-binary=:all:", "-w", str(out), *SDIST_ONLY)
        resolved = resolve(plwlab_requirements(), image, out, Path(tmp))
    built = {normalize(s.split("==")[0]) for s in SDIST_ONLY}
    missing = sorted(f"{n}=={v}" for n, v in resolved.items() if n not in image and n not in built)
    if missing:
        pip("download", "--no-deps", *TARGET, "-d", str(out), *missing)
    wheels = sorted(out.glob("*.whl"))
    names = [normalize(w.name.split("-")[0]) for w in wheels]
    if len(set(names)) != len(names):
        raise SystemExit(f"wheelhouse {out}: a package comes in two versions: {sorted(n for n in names if names.count(n) > 1)}")
    wanted = {n for n in resolved if n not in image}
    if wanted - set(names):
        raise SystemExit(f"wheelhouse {out}: no wheel for {sorted(wanted - set(names))}")
    mib = sum(w.stat().st_size for w in wheels) / 2**20
    if mib > max_mib:
        raise SystemExit(f"wheelhouse {out}: {mib:.1f} MiB is over the {max_mib:g} MiB limit")
    print(f"{out}: {len(wheels)} wheels, {mib:.1f} MiB (limit {max_mib:g}); the image provides "
          f"{len(resolved) - len(wanted)} of the {len(resolved)} resolved packages")  # fmt: skip
    return wheels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".whl")
    parser.add_argument("--max-mib", type=float, default=60.0)
    args = parser.parse_args()
    for wheel in build(args.out, args.max_mib):
        print(f"  {wheel.name}  {wheel.stat().st_size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
