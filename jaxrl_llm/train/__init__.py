"""Training entry point (``python -m jaxrl_llm.train``) and the stage registry."""
