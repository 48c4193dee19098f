"""Progress bars: widgets in JupyterLab (where ipywidgets is installed), text in headless runs (papermill through
`python -m qlib run`, nbval), whose executed notebook is a report: a widget would be stored there as an empty box."""
from __future__ import annotations

import os
import warnings

HEADLESS = "QLAB_HEADLESS"  # set by `python -m qlib run` and the tests for the kernels they start


def text_bars_when_headless() -> None:
    """In a headless run, `tqdm.auto` (qlib's bars and the libraries') gives text bars even where ipywidgets is;
    tqdm's "IProgress not found" warning (no ipywidgets in the kernel) is then beside the point and left unsaid."""
    if os.environ.get(HEADLESS) != "1":
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import tqdm.auto
        import tqdm.autonotebook
    import tqdm.std

    tqdm.auto.tqdm = tqdm.autonotebook.tqdm = tqdm.std.tqdm
    tqdm.auto.trange = tqdm.autonotebook.trange = tqdm.std.trange
