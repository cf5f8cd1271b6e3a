"""The pure modules import only torch: importing them must not load transformers (or other heavy deps)."""

import subprocess
import sys

MODULES = [
    "alignkit.losses.reward",
    "alignkit.losses.preference",
    "alignkit.losses.policy",
    "alignkit.losses.kl",
    "alignkit.ops.masking",
    "alignkit.ops.advantages",
]
HEAVY = ("transformers", "accelerate", "peft", "datasets")


def test_importing_losses_and_ops_does_not_load_heavy_dependencies():
    # A fresh interpreter, so nothing imported by other tests is in sys.modules.
    code = (
        f"import sys\nfor m in {MODULES!r}:\n    __import__(m)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"importing {MODULES} loaded {result.stdout.strip()}"
