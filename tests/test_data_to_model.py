"""The whole input path on real data: LLaMA-Factory demo file -> canonical records -> chat template ->
packed Grain batches -> device arrays on a mesh -> a model forward with a finite masked loss."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm.data.load import load_dataset
from jaxrl_llm.data.packing import next_token_targets
from jaxrl_llm.data.pipeline import make_pipeline, to_device
from jaxrl_llm.models import create_model, get_preset
from jaxrl_llm.parallel import make_mesh
from jaxrl_llm.render import Renderer, SFTEncoder, load_tokenizer
from jaxrl_llm.render.train_tokenizer import save_hf_tokenizer, train_byte_level_bpe

DATA = Path(__file__).resolve().parent / "data" / "llamafactory"


def test_demo_data_to_packed_batches_to_model(tmp_path):
    loaded = load_dataset(str(DATA / "dataset_info.json"), name="identity", on_error="raise")
    assert loaded.kind == "conversation" and loaded.counts.accepted > 50
    texts = [m["content"] for r in loaded.records for m in r["messages"]]
    tokenizer = load_tokenizer(
        save_hf_tokenizer(train_byte_level_bpe(texts, vocab_size=512), tmp_path / "tok")
    )
    renderer = Renderer(tokenizer)  # the tokenizer's own ChatML template
    renderer.check(loaded.records[0]["messages"])  # train/inference parity on a real record

    pipeline = make_pipeline(loaded.records, SFTEncoder(renderer), batch_size=4, seq_len=256, seed=0)
    batch = next(iter(pipeline))
    assert batch["tokens"].shape == (4, 256) and batch["segment_ids"].max() > 1  # several documents per row
    mesh = make_mesh()
    arrays = to_device(batch, mesh)

    model = create_model(get_preset("llama-tiny", vocab_size=tokenizer.vocab_size), mesh=mesh)
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss(state, batch):
        logits = nnx.merge(graphdef, state)(
            batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"]
        )
        targets, weights = next_token_targets(batch["tokens"], batch["loss_mask"], batch["segment_ids"])
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return (nll * weights).sum() / weights.sum(), weights.sum()

    with jax.set_mesh(mesh):
        value, n_targets = loss(state, arrays)
    assert np.isfinite(float(value)) and int(n_targets) > 0
    # Untrained, the loss is about log(V): the batch reaches the model as real tokens, not padding.
    assert abs(float(value) - np.log(tokenizer.vocab_size)) < 1.0
