"""jaxrl_llm."""
