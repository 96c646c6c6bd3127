"""One of two processes started by test_multiprocess.py: 2 processes x 2 CPU devices = one 4-device mesh."""

from __future__ import annotations

import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl_llm.models import create_model, get_preset, load_hf, save_hf
from jaxrl_llm.parallel import initialize, is_main_process, make_mesh, to_host

CFG = get_preset("llama-tiny", vocab_size=128)


def main(address: str, process_id: int, export_dir: str) -> None:
    assert initialize(address, num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = make_mesh(data=2, fsdp=2)
    model = create_model(CFG, seed=0, mesh=mesh)  # born sharded across both processes
    embedding = model.embed.embedding.get_value()
    assert not embedding.is_fully_addressable and len(embedding.addressable_shards) == 2

    # Every process holds the same global batch; each feeds only its own devices' rows.
    tokens = np.random.RandomState(0).randint(0, 128, (4, 8)).astype(np.int32)
    batch = jax.make_array_from_callback(
        tokens.shape, NamedSharding(mesh, P(("data", "fsdp"))), lambda i: tokens[i]
    )
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, batch)
    reference = create_model(CFG, seed=0)(jnp.asarray(tokens))  # this process alone, on one device
    np.testing.assert_allclose(to_host(logits), np.asarray(reference), atol=1e-5)

    save_hf(model, export_dir)  # collective gather; process 0 writes, the others wait for it
    loaded = load_hf(export_dir, mesh=mesh)
    np.testing.assert_array_equal(to_host(loaded.embed.embedding.get_value()), to_host(embedding))
    print(f"process {process_id}: multi-process checks passed (main={is_main_process()})")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else tempfile.mkdtemp())
