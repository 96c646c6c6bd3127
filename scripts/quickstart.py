"""Quickstart: the smallest real end-to-end use of jaxrl_llm, on a laptop CPU in well under a minute.

Until the training stages land (issue #4 turns this into the real quickstart training), it walks the
layers that exist:

1. reads ``configs/quickstart.py`` (plus any ``--config.key=value`` overrides) through the one validator;
2. trains a byte-level BPE tokenizer with a ChatML template in-process and loads it back;
3. builds the configured model with parameters born sharded on the configured mesh;
4. renders a chat prompt with the tokenizer's template and decodes greedily with the KV cache, checking
   every generated token against the uncached forward;
5. exports the model as an HF checkpoint, reloads it, and checks the reload gives the same logits.

    python scripts/quickstart.py [--config configs/quickstart.py] [--config.model.preset=qwen3-tiny]
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def arithmetic_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Chat-formatted sums: the synthetic task the SFT quickstart will train on."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(f"What is {a} + {b}? The answer is {a + b}.")
    return lines


def greedy_decode(model, prompt_ids, prompt_mask, max_new_tokens: int, mesh=None):
    """Prefill once, then one cached forward per token; a stand-in until the rollout layer (issue #5).

    The model crosses the jit boundary as (graphdef, state): parameters are arguments of the compiled
    step, not constants baked into it.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, mask, cache):
        out = nnx.merge(graphdef, state).forward(tokens, attention_mask=mask, cache=cache)
        return jnp.argmax(out.logits[:, -1], axis=-1), out.cache

    batch, prompt_len = prompt_ids.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens, mesh=mesh)  # born sharded like the batch
    token, cache = step(state, prompt_ids, prompt_mask, cache)
    tokens = [token]
    for _ in range(max_new_tokens - 1):
        token, cache = step(state, token[:, None], jnp.ones((batch, 1), jnp.int32), cache)
        tokens.append(token)
    return jnp.stack(tokens, axis=1)


def main(argv: list[str]) -> int:
    from jaxrl_llm.errors import EXIT_USER_ERROR, UserError

    try:
        return run(argv or ["--config", str(ROOT / "configs" / "quickstart.py")])
    except (UserError, OSError) as err:  # config, mesh, checkpoint, tokenizer or run_dir mistakes
        print(f"quickstart: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


def run(args: list[str]) -> int:
    from jaxrl_llm.config import format_config, parse_args

    cfg = parse_args(args)
    print(format_config(cfg))

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxrl_llm.models import build_model, count_params, create_model, load_hf, model_config, save_hf
    from jaxrl_llm.parallel import initialize, mesh_from_config
    from jaxrl_llm.render import load_tokenizer
    from jaxrl_llm.render.train_tokenizer import save_hf_tokenizer, train_byte_level_bpe

    initialize(cfg.parallel.coordinator_address, cfg.parallel.num_processes, cfg.parallel.process_id)
    run_dir = Path(cfg.run_dir)
    started = time.perf_counter()
    tok_dir = save_hf_tokenizer(
        train_byte_level_bpe(arithmetic_corpus(), vocab_size=384), run_dir / "tokenizer"
    )
    tokenizer = load_tokenizer(tok_dir)
    print(
        f"\n[1/4] tokenizer: {tokenizer.vocab_size} tokens, ChatML template sha256 {tokenizer.template_sha256[:12]}"
    )

    mesh = mesh_from_config(cfg.parallel)
    if cfg.model.path:
        model = build_model(cfg.model, mesh=mesh)
    else:  # a model from scratch gets the tokenizer's vocabulary; the validated config itself stays as is
        model = create_model(
            model_config(cfg.model).replace(vocab_size=tokenizer.vocab_size), seed=cfg.seed, mesh=mesh
        )
    tokenizer.check_fits(model.cfg.vocab_size)
    print(f"[2/4] model: {model.cfg.family}, {count_params(model):,} parameters on mesh {dict(mesh.shape)}")

    prompts = [
        [{"role": "user", "content": "What is 12 + 30?"}],
        [{"role": "user", "content": "What is 7 + 5?"}],
    ]
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
    ids = [tokenizer.encode(t) for t in texts]
    width = max(map(len, ids))
    pad = tokenizer.pad_id
    prompt_ids = jnp.asarray([[pad] * (width - len(x)) + x for x in ids], jnp.int32)  # left padding
    prompt_mask = jnp.asarray([[0] * (width - len(x)) + [1] * len(x) for x in ids], jnp.int32)
    with jax.set_mesh(mesh):
        generated = greedy_decode(model, prompt_ids, prompt_mask, max_new_tokens=8, mesh=mesh)
    # Every cached step must pick what the full, uncached forward picks (exactly in float32; bfloat16
    # rounding differs between the two paths and may flip a near-tie).
    full_ids = jnp.concatenate([prompt_ids, generated], axis=1)
    full_mask = jnp.concatenate([prompt_mask, jnp.ones_like(generated)], axis=1)
    logits = model(full_ids, attention_mask=full_mask)
    reference = jnp.argmax(logits[:, width - 1 : -1], axis=-1)
    agree = int((reference == generated).sum())
    exact = model.cfg.dtype == "float32"
    print(
        "[3/4] greedy decode with KV cache (untrained weights, so the text is noise); "
        f"cached == uncached for {agree}/{generated.size} tokens"
    )
    for text, row in zip(texts, np.asarray(generated), strict=True):
        print(f"      {text!r} -> {tokenizer.decode(row.tolist())!r}")

    export = save_hf(model, run_dir / "hf_export")
    c = model.cfg  # reload with the same dtypes and execution settings, so the programs are identical
    reloaded = load_hf(
        export, dtype=c.param_dtype, compute_dtype=c.dtype, remat=c.remat, scan_layers=c.scan_layers
    )
    delta = float(jnp.abs(reloaded(full_ids, attention_mask=full_mask) - logits).max())
    print(f"[4/4] exported to {export} and reloaded: max |logit difference| = {delta:.1e}")
    print(f"\nquickstart finished in {time.perf_counter() - started:.1f}s")
    failures = []
    if exact and agree != generated.size:
        failures.append("cached decoding disagrees with the uncached forward")
    if delta != 0.0:
        failures.append("the reloaded HF export gives different logits")
    for failure in failures:
        print(f"quickstart: FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main(sys.argv[1:]))
