"""Exporting any checkpoint of a run as an HF checkpoint: ``python -m jaxrl_llm.export RUN_DIR [--step N]
--out DIR`` (see ``__main__``; the work is ``jaxrl_llm.runs.export.export_checkpoint``)."""
