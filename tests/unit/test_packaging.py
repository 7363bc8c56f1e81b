"""What a wheel carries beside the code: a host installed from a wheel, without a checkout,
has the systemd units, the sysusers and tmpfiles files, the docs and the example configs
under the venv's share/ (docs/operations.md, "Install and run").

Found by a review: the wheel carried the code alone, and `make install-systemd` needs a
checkout.  A unit or doc added later must not be left out of the wheel: the lists in
pyproject.toml are compared with the tree."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def data_files() -> dict[str, list[str]]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]["data-files"]


def test_every_listed_file_exists():
    for target, sources in data_files().items():
        for source in sources:
            assert (ROOT / source).is_file(), f"{target}: {source} is not in the tree"


def test_the_wheel_carries_every_unit_and_the_files_make_install_systemd_installs():
    shipped = data_files()
    assert sorted(shipped["share/metering/systemd"]) == sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "systemd").iterdir()
    )
    docs = [*(ROOT / "docs").glob("*.md"), *(ROOT / "docs").glob("*.png")]
    assert sorted(shipped["share/doc/metering"]) == sorted(str(p.relative_to(ROOT)) for p in docs)
    assert sorted(shipped["share/doc/metering/examples"]) == [
        "configs/client.toml",
        "configs/server.toml",
    ]
