"""``python -m jaxrl_llm.config``: print every config key with its default, allowed values and meaning."""

from jaxrl_llm.config import describe

if __name__ == "__main__":
    print(describe(), end="")
