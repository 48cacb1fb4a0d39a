"""`jrft export` turns a run's checkpoint into the same transformers directory the run itself exports."""

import numpy as np
from safetensors.numpy import load_file

from jrft.commands.export import main as export_main
from jrft.config import load_config
from jrft.train.runs.offline import run_offline


def test_export_of_the_final_checkpoint_equals_the_runs_own_export(tiny_sft, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            *tiny_sft,
            f"output_dir={out}",
            "train.steps=3",
            "train.batch_size=8",
            "train.save_every=0",
        ],
    )
    run_offline(cfg, progress=False)
    assert export_main([str(out), str(tmp_path / "exported")]) == 0
    ours, theirs = (
        load_file(str(out / "export" / "model.safetensors")),
        load_file(str(tmp_path / "exported" / "model.safetensors")),
    )
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert (tmp_path / "exported" / "tokenizer.json").exists()
    assert export_main([str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_export_refuses_a_checkpoint_with_non_finite_weights(tiny_sft, tmp_path, capsys):
    import jax
    import jax.numpy as jnp

    from jrft.train.checkpoint import Checkpointer

    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            *tiny_sft,
            f"output_dir={out}",
            "train.steps=1",
            "train.batch_size=8",
            "train.save_every=0",
        ],
    )
    run_offline(cfg, progress=False)
    # A checkpoint written before jrft checked finiteness: every float array made inf.
    ckpt = Checkpointer(out / "checkpoints")
    state, meta = ckpt.restore(None, None)
    poisoned = jax.tree.map(
        lambda x: x * jnp.inf if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, state
    )
    ckpt.save(99, poisoned, meta)
    ckpt.close()
    assert export_main([str(out), str(tmp_path / "exported"), "--step", "99"]) == 2
    err = capsys.readouterr().err
    assert "step 99" in err and "NaN/inf parameters" in err
    assert not (tmp_path / "exported").exists()
