"""Offline evaluation: ``python -m jaxrl_llm.eval TARGET --data PATH ...`` (see ``__main__``).

The evaluator itself is ``jaxrl_llm.train.eval_run`` (training runs the same one for ``eval.sets``); this
package is its command line over a run directory or an HF checkpoint.
"""
