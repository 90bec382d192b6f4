"""The method registry: discovery, lookup errors, a new method plugged in without touching anything else."""
from __future__ import annotations

import pytest
import torch

import rpl.methods as methods
from rpl.errors import RPLInputError
from rpl.evaluation import Evaluator, EvalOptions, check_methods
from rpl.methods.base import Method


def test_builtin_methods_are_discovered():
    assert {"rpl", "pebal", "energy", "msp", "maxlogit", "entropy", "mcdropout"} <= set(methods.available())
    assert set(methods.trainable()) >= {"rpl", "pebal"}
    for name in methods.available():
        m = methods.get(name)
        assert m.name == name and m.kind in ("post-hoc", "add-on", "fine-tune")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(RPLInputError, match="unknown method 'nope'; known methods: .*pebal.*rpl"):
        methods.get("nope")
    with pytest.raises(RPLInputError, match="rpl-train --method accepts"):
        from rpl.config import load_config
        from rpl.training import build_model

        build_model(load_config(None, ["method=energy", "segmenter.weights=null"]), torch.device("cpu"))


def test_rpl_train_refuses_an_unknown_method_listing_only_trainable_ones(tmp_path, capsys):
    from rpl.cli.train import main

    assert main(["--method", "nope", "--work-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    accepted = err.split("accepts", 1)[1]
    assert "unknown method 'nope'" in err and "rpl" in accepted and "pebal" in accepted
    assert "energy" not in accepted and "Traceback" not in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_registered_method_is_scored_by_the_evaluator(monkeypatch):
    """What adding a method takes: a registered class. The evaluator then scores it with no other change."""
    class Negated(Method):
        name, kind = "negated-maxlogit", "post-hoc"

        def scorer(self, model, options):
            return lambda x, logits, out: logits.float().amax(1)

    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    methods.register(Negated)
    assert "negated-maxlogit" in methods.available()
    assert check_methods(["negated-maxlogit", "energy"]) == ("negated-maxlogit", "energy")
    seg = torch.nn.Conv2d(3, 4, 1)
    ev = Evaluator(seg, EvalOptions(methods=("negated-maxlogit", "maxlogit"), progress=False))
    x = torch.randn(1, 3, 5, 6)
    logits = seg(x)
    s = ev.scores(x, logits, None)
    torch.testing.assert_close(s["negated-maxlogit"], -s["maxlogit"])
    with pytest.raises(ValueError, match="registered twice"):
        class Other(Negated):
            pass
        methods.register(Other)


def test_export_scorers_give_the_evaluators_maps():
    """``Method.export_scorer`` (what rpl-export traces) equals ``Method.scorer`` (what rpl-eval and
    rpl-predict score) for the post-hoc methods, RPL and PEBAL, on the model each scores."""
    import rpl
    from models_for_tests import ToySegmenter, tuned_pebal
    from rpl.scores import exportable_smooth, smooth
    from rpl.wrapping import extract_logits

    s = torch.randn(2, 20, 30)
    torch.testing.assert_close(exportable_smooth((7, 1.0))(s), smooth(s), rtol=0, atol=1e-6)
    torch.testing.assert_close(exportable_smooth((5, 2.0))(s), smooth(s, 5, 2.0), rtol=0, atol=1e-6)
    assert torch.equal(exportable_smooth(None)(s), s)
    torch.manual_seed(0)
    bare = ToySegmenter(num_classes=5).eval()
    models = {"rpl": rpl.wrap(ToySegmenter(num_classes=5).eval(), head="head", block={"width": 8}),
              "pebal": tuned_pebal(ToySegmenter(num_classes=5).eval(), 5)}
    x = torch.randn(2, 3, 32, 48)
    options = EvalOptions(methods=("energy",), progress=False)
    post_hoc = [n for n in methods.available() if methods.get(n).kind == "post-hoc" and methods.get(n).one_forward]
    assert {"energy", "msp", "maxlogit", "entropy"} <= set(post_hoc) and "mcdropout" not in post_hoc
    for name in [*post_hoc, *models]:  # a new method's own test checks its export_scorer on its model
        method = methods.get(name)
        model = models.get(name, bare)
        with torch.no_grad():
            out = model(x)
            logits, out = (out.logits, out) if hasattr(model, "segmenter") else (extract_logits(out), None)
            expected = method.scorer(model, options)(x, logits, out)
            torch.testing.assert_close(method.export_scorer(model, options)(x, logits, out), expected,
                                       rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["pebal", "real", "meta-ood"])
def test_every_trainable_method_resumes_to_the_same_weights(tmp_path, name):
    """Interrupted after 2 of 4 steps and resumed, a run ends with the tensors of the run straight through
    (rpl's own resume tests: tests/test_training.py)."""
    from safetensors.torch import load_file

    from rpl.cli.train import main as train_main
    from rpl.training import Trainer
    from train_world import make_world, overrides

    world = make_world(tmp_path / "world", n_train=4, n_val=2, n_coco=4)
    sets = overrides(world, steps=4, **{"data.paste_prob": 0.5, "train.checkpoint_every": 1, "train.val_every": 2,
                                        "meta-ood.classifier": False} if name == "meta-ood" else
                     {"data.paste_prob": 0.5, "train.checkpoint_every": 1, "train.val_every": 2})
    args = lambda work, *extra: ["--method", name, *extra, "--work-dir", str(work), "--quiet",
                                 *sum((["--set", s] for s in sets), [])]
    assert train_main(args(tmp_path / "straight")) == 0
    real_step = Trainer.step

    def interrupting(self, batch):
        if self.progress.step == 2:
            raise KeyboardInterrupt
        return real_step(self, batch)

    Trainer.step = interrupting
    try:
        assert train_main(args(tmp_path / "resumed")) == 130
    finally:
        Trainer.step = real_step
    assert train_main(args(tmp_path / "resumed", "--resume")) == 0
    straight = load_file(str(tmp_path / "straight" / "last.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "last.safetensors"))
    assert straight.keys() == again.keys() and straight
    for key in straight:
        assert torch.equal(straight[key], again[key]), key
