"""notebooks/new_transform.ipynb runs top to bottom (tiny config), so it cannot rot: it
writes a k-means weight-sharing transform, checks it, trains with it through the harness
next to built-in 4-bit QAT and plots accuracy against size."""
import os

import nbformat
from nbclient import NotebookClient

NOTEBOOK = os.path.join(os.path.dirname(__file__), os.pardir, "notebooks", "new_transform.ipynb")


def test_new_transform_notebook_runs(procedural_dir, tiny_dense_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("MMJAX_NOTEBOOK_WORKDIR", str(tmp_path))
  monkeypatch.setenv("MMJAX_NOTEBOOK_DENSE", tiny_dense_dir)  # the shared run: not trained again
  monkeypatch.setenv("MMJAX_DATA_DIR", procedural_dir)
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # as conftest: fast compiles
  monkeypatch.setenv("PYTHONPATH", os.path.abspath(os.path.join(os.path.dirname(NOTEBOOK),
                                                                os.pardir)))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "k-means 16 (ours)" in outputs and "uniform 4-bit QAT (built in)" in outputs
  assert os.path.exists(tmp_path / "kmeans_vs_qat4.png")
  assert os.path.exists(tmp_path / "kmeans16" / "compression_report.json")
