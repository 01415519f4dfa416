"""notebooks/depth_analysis.ipynb runs headless (nbclient, this venv's python3 kernel) on the results folder of
a tiny end-to-end evaluation and draws its figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.configs import compose_tiny

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "depth_analysis.ipynb"


def tiny_results(tmp_path: Path) -> Path:
    """`src.eval` of the mixed-routing tiny checkpoint (tests/test_streamer.py), 1 example per task."""
    from src.eval.__main__ import run
    from src.flexidepth import save_flexidepth
    from tests.test_streamer import mixed_tiny_llama

    ckpt = save_flexidepth(mixed_tiny_llama(), tmp_path / "ckpt")
    out = tmp_path / "eval"
    cfg = compose_tiny(
        "evaluate",
        [
            f"ckpt_path={ckpt}",
            "eval.n_per_task=1",
            "eval.max_new_tokens=4",
            "eval.ppl_max_articles=1",
            "eval.ppl_max_length=64",
        ],
        out,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(cfg)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_depth_analysis_notebook_executes(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    results = tiny_results(tmp_path)
    for name in ("results.json", "depthmap.parquet", "depthmap.html"):
        assert (results / name).is_file(), name
    assert json.loads((results / "results.json").read_text())["routed_layers"] == [2, 3]

    nb = nbformat.read(NOTEBOOK, as_version=4)
    n_cells = len(nb.cells)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs
    # one extra cell (in memory only): which python the kernel runs and what the notebook loaded
    nb.cells.append(
        nbformat.v4.new_code_cell("import sys; print(sys.executable); print(results_dir, len(records))")
    )
    monkeypatch.setenv("FLEXIDEPTH_RESULTS", str(results))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,
        resources={"metadata": {"path": str(ROOT)}},  # the kernel's working directory: `import src` works
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 3  # run fraction, layer x position, task depth (+ layers-used distribution)
    assert len(pngs) == 5  # + layers used by token category (src/eval/analysis.py)
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert any("## The paper's claims" in m and "| copied |" in m for m in markdown)
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    frame = next(h for h in html if h.startswith("<div><iframe srcdoc="))
    assert "class=&quot;tok&quot;" in frame and "fd-legend" in frame

    from src.eval import load_depthmap

    # the extra cell: this venv's interpreter, the folder given by FLEXIDEPTH_RESULTS, every DepthMap row
    last = "".join(o.get("text", "") for o in nb.cells[n_cells].outputs)
    executable, loaded = last.strip().splitlines()
    assert executable == sys.executable
    assert loaded == f"{results} {len(load_depthmap(results / 'depthmap.parquet'))}"
