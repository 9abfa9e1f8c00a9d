"""What reaches the console: fedray's own lines (progress, results, its warnings and errors).
Dependencies' INFO logs and their warnings go to a log file instead; their errors still show."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

DEPENDENCIES = ("ray", "mlflow", "alembic", "torch", "opacus", "onnxscript", "onnx_ir", "urllib3", "py.warnings")
_PACKAGE = Path(__file__).parent
_installed: list[Path] = []


def to_file(path: Path) -> None:
    """Send the dependencies' log records to ``path`` (appended; errors also to the console) and
    warnings raised outside fedray to it too. Once per process: later calls change nothing."""
    if _installed:
        return
    _installed.append(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    into_file = logging.FileHandler(path, encoding="utf-8", delay=True)
    into_file.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.ERROR)
    for name in DEPENDENCIES:
        logger = logging.getLogger(name)
        logger.handlers = [into_file, console]
        logger.propagate = False
        if logger.level in (logging.NOTSET, logging.DEBUG):
            logger.setLevel(logging.INFO)
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if Path(filename).resolve().is_relative_to(_PACKAGE):
            shown(message, category, filename, lineno, file, line)
        else:
            logging.getLogger("py.warnings").warning("%s:%s: %s: %s", filename, lineno, category.__name__, message)

    warnings.showwarning = show
