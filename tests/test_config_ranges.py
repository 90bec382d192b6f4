"""Config values out of their meaningful range, and scalar sections, are one-line errors naming the key."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from rpl.cli.train import main as train_main
from rpl.config import Config, load_config, method_option_classes, rules
from rpl.errors import RPLInputError

RANGES, CHOICES, FREE_NUMERIC = rules()  # the fixed sections' and every method's (declared on its Options)


def _bad_value(key: str, rule: str):
    default = getattr(getattr(Config(), key.split(".")[0]), key.split(".")[1])
    if rule.startswith("["):
        bad = 1.5 if rule.endswith("]") else 1.0
    elif rule == "> 0":
        bad = 0
    else:
        bad = float(rule.split()[1]) - 1
    bad = int(bad) if isinstance(default, int) or (isinstance(default, list) and isinstance(default[0], int)) \
        or key in ("wrap.rates", "wrap.projection_dim", "optim.iterations", "train.val_limit") else bad
    return [*default[:-1], bad] if isinstance(default, list) else bad


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_range_rule_refuses_a_bad_value_naming_the_key(key):
    bad = _bad_value(key, RANGES[key])
    with pytest.raises(RPLInputError) as err:
        load_config(None, [f"{key}={bad}"])
    message = str(err.value)
    assert message.startswith(f"config key {key!r}") and "\n" not in message and "expected" in message


def test_every_numeric_config_key_has_a_range_rule():
    """A new int/float key needs a RANGES entry (or a reason here): meaningless values must be caught."""
    free = set(FREE_NUMERIC)  # each with its reason in rpl/config.py
    sections = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}
    sections.update(method_option_classes())  # method options sections (e.g. pebal) count too
    numeric = set()
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        for name, hint in hints.items():
            args = set(typing.get_args(hint)) or {hint}
            if args & {int, float}:
                numeric.add(f"{section}.{name}")
    assert {"pebal.ood_reg", "pebal.m_in"} <= numeric
    assert len(numeric) > 25 and numeric - set(RANGES) - free == set()
    for key in (*RANGES, *CHOICES):
        section, name = key.split(".")
        assert hasattr(getattr(Config(), section), name), key


@pytest.mark.parametrize("sets, expected", [
    (["train.checkpoint_every=0"], "config key 'train.checkpoint_every' is 0; expected an integer >= 1."),
    (["optim.lr=-1"], "config key 'optim.lr' is -1.0; expected a number > 0."),
    (["optim.lr=.nan"], "config key 'optim.lr' is nan; expected a number > 0."),
    (["data.flip_p=1.5"], "config key 'data.flip_p' is 1.5; expected a number in [0, 1]."),
    (["data.crop_size=[64]"], "config key 'data.crop_size' is [64]; expected two integers >= 1 (H and W)."),
    (["wrap.rates=[1, 0]"], "config key 'wrap.rates' holds 0; expected values >= 1."),
    (["loss.energy_loss=squared"], "config key 'loss.energy_loss' is 'squared'; expected one of hinge, pebal."),
    (["optim=5"], "--set 'optim=5': 'optim' is a config section; set one of its keys"),
    (["train.seed=1", "optim.lr=1", "optim=5"], "--set 'optim=5': 'optim' is a config section"),
])
def test_messages(sets, expected):
    with pytest.raises(RPLInputError) as err:
        load_config(None, sets)
    assert expected in str(err.value)


def test_valid_edges_pass():
    cfg = load_config(None, ["train.val_every=0", "data.flip_p=0", "data.paste_prob=1", "optim.iterations=null",
                             "optim.grad_clip=null", "loss.contrastive=0", "data.ood_val_fraction=0"])
    assert cfg.train.val_every == 0 and cfg.optim.iterations is None


def test_scalar_section_in_a_file_is_blamed_on_the_file_not_on_a_set(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("optim: 5\n")
    assert train_main(["--config", str(path), "--set", "optim.lr=1e-4", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert f"config file {path}: section 'optim' is 5; expected a mapping" in err and "--set" not in err
    assert train_main(["--set", "optim=5", "--set", "optim.lr=1", "--print-config"]) == 2
    assert "--set 'optim=5'" in capsys.readouterr().err


def test_checkpoint_every_zero_is_refused_before_training(tmp_path, capsys):
    assert train_main(["--work-dir", str(tmp_path / "w"), "--set", "train.checkpoint_every=0"]) == 2
    err = capsys.readouterr().err
    assert "train.checkpoint_every" in err and "Traceback" not in err and not (tmp_path / "w").exists()


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_rule_refuses_another_value_naming_the_key(key):
    with pytest.raises(RPLInputError) as err:
        load_config(None, [f"{key}=no-such-choice"])
    assert str(err.value) == (f"config key {key!r} is 'no-such-choice'; expected one of "
                              f"{', '.join(CHOICES[key])}.")


def test_method_rules_come_from_the_methods_own_options():
    """A method declares its rules on its Options (its own module): nothing to add in rpl/config.py."""
    for section, cls in method_option_classes().items():
        for key in getattr(cls, "RANGES", {}):
            assert RANGES[f"{section}.{key}"] == cls.RANGES[key]
        for key in getattr(cls, "CHOICES", {}):
            assert CHOICES[f"{section}.{key}"] == tuple(cls.CHOICES[key])
    assert {"pebal.tune", "meta-ood.solver", "real.head"} <= set(CHOICES) and "pebal.m_in" in FREE_NUMERIC
