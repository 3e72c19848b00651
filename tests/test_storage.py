"""Typed storage: the one bit packing (NumPy on the host, jnp in a program) against an
independent bit-by-bit reference, and the records the export learned with protocol v2
(low-rank factors, k-means codebooks) stored at their real bytes, loaded back to the view,
and computed in the artifact ((x a) b for factors, never the [K, N] kernel)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.compress import (Method, Plan, artifact, bitpack, export, flatten, lowrank, report,
                            rules, storage)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7, 8])
def test_one_bit_packing_round_trips_in_numpy_and_jnp(bits):
  u = np.random.default_rng(bits).integers(0, 2 ** bits, size=37).astype(np.uint8)
  packed = bitpack.pack(u, bits)
  assert packed.size == -(-37 * bits // 8)
  np.testing.assert_array_equal(bitpack.unpack(packed, 37, bits), u)
  np.testing.assert_array_equal(np.asarray(jax.jit(
      lambda b: bitpack.unpack(b, 37, bits, jnp))(packed)), u)
  if bits == 4:  # two a byte, the first code in the low nibble
    assert packed[0] == (u[0] | (u[1] << 4))
  elif bits != 8:  # bit planes: code i's bit j is stream bit i * bits + j (MSB-first bytes)
    stream = [(int(u[i]) >> j) & 1 for i in range(37) for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    want = [int("".join(map(str, stream[k:k + 8])), 2) for k in range(0, len(stream), 8)]
    np.testing.assert_array_equal(packed, want)


def _snap(k):
  """A k-value codebook method: every weight snapped to one of k quantiles."""
  def init(flat, rng):
    return {p: jnp.quantile(w.reshape(-1), jnp.linspace(0.0, 1.0, k)) for p, w in flat.items()}

  def view(flat, state):
    return {p: state[p][jnp.argmin(jnp.abs(w[..., None] - state[p]), -1)]
            for p, w in flat.items()}
  return Method(f"kmeans{k}", init=init, view=view,
                describe=lambda flat, s: {p: storage.Codebook(s[p]) for p in flat})


def test_factors_and_codebooks_export_at_their_bytes_and_run_in_the_artifact(tmp_path):
  rng = np.random.default_rng(0)
  params = {"fac": {"kernel": rng.normal(size=(64, 48)).astype(np.float32)},
            "cb": {"kernel": rng.normal(size=(40, 24)).astype(np.float32)},
            "bias": rng.normal(size=(24,)).astype(np.float32)}
  params = jax.tree.map(jnp.asarray, params)
  plan = Plan(rules([("fac/kernel", lowrank.factorize(rank=6))]),
              rules([("cb/kernel", _snap(16))]))
  cstate = plan.init(params, jax.random.PRNGKey(0))
  view = flatten(plan.view(params, cstate))
  out = str(tmp_path / "e")
  index = export.export(params, out, plan, cstate, zstd=False)
  loaded = flatten(export.load(out))
  np.testing.assert_allclose(loaded["fac/kernel"], view["fac/kernel"], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(loaded["cb/kernel"], view["cb/kernel"])  # the codebook's values
  assert index["cb/kernel"]["codebook"]["bits"] == 4
  rows = {r["path"]: r for r in report.build(params, plan, cstate)["leaves"]}
  assert rows["fac/kernel"]["compressed_bytes"] == 4 * (64 + 48) * 6
  assert rows["cb/kernel"]["compressed_bytes"] == 40 * 24 // 2 + 4 * 16
  assert rows["fac/kernel"]["format"] == "low_rank r=6" and rows["cb/kernel"]["bits"] == 4
  # on disk: the factors and the 4-bit indices, not 4 bytes a weight
  dense = str(tmp_path / "dense")
  export.export(params, dense, zstd=False)
  saved = 4 * (64 * 48 + 40 * 24) - (4 * (64 + 48) * 6 + 40 * 24 // 2 + 64)
  assert export.disk_bytes(dense) - export.disk_bytes(out) > 0.85 * saved  # Orbax metadata

  def apply(p, x):
    return (x @ p["fac"]["kernel"])[:, :40] @ p["cb"]["kernel"] + p["bias"]
  bufs, meta = artifact.weights_from_export(out)
  x = rng.normal(size=(5, 64)).astype(np.float32)
  f = jax.jit(artifact.forward(apply, meta))
  np.testing.assert_allclose(np.asarray(f(bufs, x)), np.asarray(apply(unflatten_view(view), x)),
                             rtol=1e-4, atol=1e-4)
  # the factorized product is (x a) b: the compiled program never forms the [64, 48] kernel
  hlo = f.lower(bufs, x).compile().as_text()
  assert "f32[64,6]" in hlo and "f32[64,48]" not in hlo


def unflatten_view(view):
  from mmjax.compress import unflatten
  return unflatten(view)
