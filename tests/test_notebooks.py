"""Every notebook under notebooks/ executes end to end (tiny settings) in the current interpreter's kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def execute(notebook, folder: Path, tmp_path: Path, monkeypatch) -> None:
    """Run every cell in a ``python3`` kernel with the notebooks' tiny settings; a cell error raises."""
    import nbclient  # the dev extra: nbclient, nbformat, ipykernel (a missing one fails, never skips)

    # the kernel inherits this environment: tiny settings, the data cache and temporary folders in tmp_path
    monkeypatch.setenv("AVMT_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("AVMT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's working folder, kept there even when a cell fails
    # kernel "python3" = ipykernel's spec, whose "python" argv jupyter_client replaces by sys.executable:
    # the kernel runs in this interpreter (this venv); nothing is installed at test time
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(folder)}})
    client.execute()  # raises CellExecutionError at the first cell that errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path, monkeypatch) -> None:
    import nbformat
    from nbclient.exceptions import CellExecutionError

    before = sorted(NOTEBOOK_DIR.rglob("*"))
    notebook = nbformat.read(path, as_version=4)
    try:
        execute(notebook, path.parent, tmp_path, monkeypatch)
    except CellExecutionError as error:
        pytest.fail(f"{path.name}: a cell failed:\n{error}")
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.output_type == "error"]
    assert any("image/png" in out.get("data", {}) for out in outputs), f"{path.name}: no image output"
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    if path.stem == "quickstart":
        assert "predictions in" in text and "generated:" in text and "answer:" in text, text[-2000:]
    assert sorted(NOTEBOOK_DIR.rglob("*")) == before  # the notebook wrote nothing next to itself


def test_a_failing_cell_fails_the_run(tmp_path: Path, monkeypatch) -> None:
    import nbformat
    from nbclient.exceptions import CellExecutionError
    from nbformat.v4 import new_code_cell, new_notebook

    notebook = new_notebook(cells=[new_code_cell("x = 1"), new_code_cell("raise ValueError('broken cell')")])
    with pytest.raises(CellExecutionError, match="broken cell"):
        execute(notebook, tmp_path, tmp_path, monkeypatch)
    assert nbformat.validate(notebook) is None
