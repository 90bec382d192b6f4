"""The console scripts are registered and print their help."""
from __future__ import annotations

import configparser
import importlib
from pathlib import Path

import pytest

SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"


def _scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    lines = [l.strip() for l in cfg["options.entry_points"]["console_scripts"].splitlines() if l.strip()]
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_all_commands_registered():
    assert set(_scripts()) == {"rpl-train", "rpl-eval", "rpl-data", "rpl-predict", "rpl-export"}


@pytest.mark.parametrize("name", ["rpl-train", "rpl-eval", "rpl-data", "rpl-predict", "rpl-export"])
def test_help(name, capsys):
    module, func = _scripts()[name].split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert f"usage: {name}" in capsys.readouterr().out
