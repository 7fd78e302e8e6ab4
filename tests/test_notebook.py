"""examples/interactive.ipynb runs top to bottom in a real Jupyter kernel (this venv's python)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_interactive_notebook_runs(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # A kernelspec for the interpreter running the tests, so the kernel sees the same venv.
    spec_dir = tmp_path / "jupyter" / "kernels" / "lockstep-test"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "lockstep test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.chdir(tmp_path)  # runs/ lands here

    nb = nbformat.read(ROOT / "examples" / "interactive.ipynb", as_version=4)
    NotebookClient(nb, kernel_name="lockstep-test", timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = {i: "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in c.outputs)
               for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(outputs.values())
    assert "'barrier/num_differing_tokens'" in text
    assert "policy_version': 2" in text  # two steps ran
    # generate() answered with the policy the two steps produced
    assert ", 2)" in outputs[5]
    # the history has the three steps
    assert "(3, " in outputs[9]
    assert (tmp_path / "runs").is_dir()
