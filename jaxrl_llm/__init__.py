"""jaxrl_llm: JAX-native post-training of LLMs with reinforcement learning and preference objectives."""

import os

# transformers serves tokenizers, chat templates and config classes here, never models, so its start-up
# notice that PyTorch is missing is expected noise; users who want its warnings set the variable.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
