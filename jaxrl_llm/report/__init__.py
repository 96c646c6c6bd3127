"""``python -m jaxrl_llm.report RUN_DIR [RUN_DIR ...]``: plots and a one-page HTML report of training runs.

The rendering lives in :mod:`jaxrl_llm.observe.report` (the training loop calls its ``write_plots`` at the end
of every run); this package is the command line.
"""

from jaxrl_llm.observe.report import write_plots, write_report

__all__ = ["write_plots", "write_report"]
