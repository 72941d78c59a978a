"""Honest version floors: setup.cfg's lower bounds are exactly what `make install` pins (constraints-min.txt),
and so what this test run uses; a floor nobody tests cannot creep back in."""
import configparser
import re
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _floors() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in cfg["options.extras_require"].values():  # every extra: the test extra pulls them all in
        lines += extra.splitlines()
    out = {}
    for line in (x.strip() for x in lines):
        if line and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[A-Za-z0-9_,-]+\])?>=([0-9.]+)(,.*)?", line)
            assert m, f"setup.cfg: {line!r} has no >= floor"
            assert out.get(m.group(1).lower(), m.group(3)) == m.group(3), f"setup.cfg: two floors for {m.group(1)}"
            out[m.group(1).lower()] = m.group(3)
    return out


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints-min.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, v = line.split("==")
            pins[name.strip().lower()] = v.strip()
    return pins


def test_constraints_pin_every_floor():
    assert _pins() == _floors()


def test_installed_versions_are_the_floors():
    wrong = {n: (v, version(n)) for n, v in _floors().items() if version(n).split("+")[0] != v}
    assert not wrong, f"installed versions differ from the setup.cfg floors (floor, installed): {wrong}"
