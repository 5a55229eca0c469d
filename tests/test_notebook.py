from pathlib import Path

import nbformat
from conftest import ROOT, SHARED_DATA
from nbclient import NotebookClient
from test_analysis import synthetic_results

FIXTURE = SHARED_DATA.parent / "fixtures" / "analysis" / "results.csv"


def test_analysis_notebook_runs_end_to_end(tmp_path, monkeypatch):
    results = FIXTURE if FIXTURE.exists() else tmp_path / "results.csv"
    if not FIXTURE.exists():
        synthetic_results().to_csv(results, index=False)
    monkeypatch.setenv("PLWLAB_RESULTS", str(results))
    monkeypatch.setenv("PLWLAB_ANALYSIS_OUT", str(tmp_path / "out"))
    nb = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2
    assert (Path(tmp_path) / "out" / "gam.json").exists()
