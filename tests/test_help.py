"""`python run.py --help`: short, names the options a first run needs, and answers without loading torch."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_help_is_short_names_the_key_options_and_does_not_import_torch():
    # -X importtime lists every module the process imports (on stderr), wherever the import happens.
    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "run.py"), "--help"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "shots=K" in result.stdout and "trainer.max_epochs=N" in result.stdout and "--cfg job" in result.stdout
    assert "method: calip, clap, clip_adapter, clip_lora, cocoop, coop," in result.stdout
    assert "eval.attack=pgd" in result.stdout
    assert len(result.stdout.splitlines()) < 40
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "hydra" in imported  # the listing is read right, so the absence below means something
    assert "torch" not in imported and "lightning" not in imported
