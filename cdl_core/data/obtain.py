"""Put Fashion-MNIST on this machine: `python -m cdl_core.data.obtain` (`make data`, run by `make demo`/`make test`).

Order: the files already in a folder the loader searches -> done; else Debian's package dataset-fashion-mnist
through apt-get (as root, or with sudo); else torchvision's download into the data cache; else one error line
naming both ways. Importing this module imports neither torch nor torchvision (`--help` stays instant); the
steps import the loader module, and torchvision only where they download.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cdl_core.cli import run_cli
from cdl_core.errors import DatasetNotFoundError

log = logging.getLogger(__name__)

APT_PACKAGE = "dataset-fashion-mnist"
APT_UPDATE = ("apt-get", "update", "-qq")
APT_INSTALL = ("apt-get", "install", "-y", "-qq", APT_PACKAGE)


def _apt_prefix() -> list[str] | None:
    """[] as root, ["sudo"] for a user with sudo, None where apt-get cannot be run."""
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        return []
    return ["sudo"] if shutil.which("sudo") else None


def _apt_install(prefix: list[str]) -> str | None:
    """Run apt-get update + install; None on success, else what failed."""
    # sudo's env_reset may drop DEBIAN_FRONTEND; the package asks no debconf questions, so -y suffices there
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (APT_UPDATE, APT_INSTALL):
        cmd = [*prefix, *args]
        try:
            code = subprocess.run(cmd, env=env, check=False).returncode
        except OSError as err:
            return f"`{' '.join(cmd)}` could not start ({err})"
        if code != 0:
            return f"`{' '.join(cmd)}` exited with status {code}"
    return None


def obtain_fashion_mnist(root: str | None = None, *, use_apt: bool = True, use_download: bool = True) -> Path:
    """The folder holding Fashion-MNIST's four idx .gz files, installing or downloading them when missing.

    root: data.root (searched first; a download goes there instead of the cache when given).
    Raises DatasetNotFoundError when every allowed way failed.
    """
    from cdl_core.data import fashion_mnist as fm  # imports torch: only once a lookup is asked for

    found = fm.find_fashion_mnist(root)
    if found is not None:
        return found
    tried: list[str] = []  # why each way did not give the files, for the final error

    prefix = _apt_prefix() if use_apt else None
    if not use_apt:
        tried.append("apt-get: not tried (disabled)")
    elif prefix is None:
        tried.append("apt-get: not on PATH" if shutil.which("apt-get") is None else "apt-get: needs root or sudo")
    else:
        sudo = "sudo " if prefix else ""
        log.info("Fashion-MNIST: installing Debian's package %s (Fashion-MNIST into %s): `%s%s && %s%s`",
                 APT_PACKAGE, fm.DEBIAN_DIR, sudo, " ".join(APT_UPDATE), sudo, " ".join(APT_INSTALL))
        failure = _apt_install(prefix)
        found = fm.find_fashion_mnist(root)
        if found is not None:
            return found
        failure = failure or f"{APT_PACKAGE} installed, but its files are in none of the searched folders"
        tried.append(f"apt-get: {failure}")
        log.warning("Fashion-MNIST: apt-get did not give the files (%s); %s", failure,
                    "trying torchvision's download" if use_download else "the download is disabled")

    from cdl_core.data.base import default_data_root

    target = Path(root).expanduser() if root else default_data_root()
    if not use_download:
        tried.append("download: not tried (disabled)")
    else:
        log.info("Fashion-MNIST: downloading it with torchvision into %s", target / "FashionMNIST" / "raw")
        try:
            fm.download_fashion_mnist(target)
        except (RuntimeError, OSError) as err:  # torchvision: RuntimeError after every mirror; URLError offline
            tried.append(f"download: failed ({err})")
            log.warning("Fashion-MNIST: the download failed (%s)", err)
        else:
            found = fm.find_fashion_mnist(root)
            if found is not None:
                return found
            tried.append(f"download: finished, but the files are not in {target / 'FashionMNIST' / 'raw'}")

    how = (f"`sudo apt-get update && sudo apt-get install {APT_PACKAGE}` (Debian), or when online "
           f"`python -m cdl_core.data.obtain` (torchvision's download into {target}); tried: {'; '.join(tried)}")
    raise DatasetNotFoundError("fashion_mnist", fm.candidate_dirs(root), how)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m cdl_core.data.obtain",
        description="Find Fashion-MNIST, else install Debian's dataset-fashion-mnist (apt-get), else download it "
                    "with torchvision into $CDL_DATA_ROOT or ~/.cache/cdl/data; prints the folder.",
    )
    p.add_argument("--root", default=None, help="data.root: searched first, and the download target if given")
    p.add_argument("--no-apt", action="store_true", help="never run apt-get")
    p.add_argument("--no-download", action="store_true", help="never download")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    folder = obtain_fashion_mnist(args.root, use_apt=not args.no_apt, use_download=not args.no_download)
    print(f"Fashion-MNIST: {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
