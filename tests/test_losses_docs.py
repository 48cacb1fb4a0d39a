"""docs/losses.md: its example (SFT then GRPO in a plain JAX + optax loop) runs and its asserts hold."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def test_losses_doc_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert blocks, f"{DOC}: no ```python block found"
    namespace = {"__name__": "losses_doc_example"}
    exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)
    # The example's own asserts check learning; make sure it really ran to the end.
    assert len(namespace["history"]) == 40
