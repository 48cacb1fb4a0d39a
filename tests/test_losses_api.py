"""jrft.losses as a library: self-contained, documented, registries by name."""

import ast
import inspect
from pathlib import Path

import pytest

import jrft.losses as L

PACKAGE = Path(L.__file__).parent
PUBLIC = {n: obj for n, obj in vars(L).items() if not n.startswith("_") and not inspect.ismodule(obj)}


def test_imports_nothing_from_the_rest_of_jrft():
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jrft"):
                assert node.module.startswith("jrft.losses"), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("jrft"), f"{path.name} imports {alias.name}"


def test_every_public_function_documents_shapes():
    functions = {name: obj for name, obj in PUBLIC.items() if inspect.isfunction(obj)}
    assert len(functions) >= 25
    for name, fn in functions.items():
        doc = inspect.getdoc(fn) or ""
        assert "[" in doc and "]" in doc, f"{name}: docstring gives no shapes"


def test_fixed_signatures():
    assert list(inspect.signature(L.dpo_loss).parameters) == [
        "policy_chosen_logps",
        "policy_rejected_logps",
        "ref_chosen_logps",
        "ref_rejected_logps",
        "beta",
        "loss_type",
        "label_smoothing",
        "discopop_tau",
        "where",
    ]
    params = inspect.signature(L.grpo_loss).parameters
    assert list(params)[:5] == ["logps", "old_logps", "ref_logps", "advantages", "mask"]
    for name in ("clip_eps_low", "clip_eps_high", "beta", "kl_estimator", "aggregation", "importance_level"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    for name in ("max_completion_length", "num_tokens", "num_sequences", "num_rows"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert list(inspect.signature(L.gae).parameters)[:3] == ["rewards", "values", "mask"]
    assert list(inspect.signature(L.group_advantages).parameters)[:2] == ["rewards", "group_size"]


@pytest.mark.parametrize(
    ("registry", "names"),
    [
        (L.DPO_LOSSES, {"sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair"}),
        (L.KL_ESTIMATORS, {"k1", "k2", "k3"}),
        (L.AGGREGATIONS, {"grpo", "bnpo", "dr_grpo", "dapo"}),
        (L.IMPORTANCE_LEVELS, {"token", "sequence"}),
        (L.ADVANTAGE_SCALES, {"group", "batch", "none"}),
        (L.BASELINES, {"group_mean", "rloo", "batch_mean"}),
        (L.SFT_REDUCTIONS, {"token", "sequence"}),
    ],
)
def test_registries_hold_the_documented_variants(registry, names):
    assert names <= set(registry)
    for name, fn in registry.items():
        assert callable(fn) and inspect.getdoc(fn), f"{name} has no docstring"
