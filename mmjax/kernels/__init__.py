"""The attention kernel, softmax(QK^T/sqrt(d_k))V, that every model here is built on: the
reference (`attention`), a memory-bounded chunked form (`chunked_attention`) and JAX's own
Pallas flash kernels behind one switch (`pallas_attention`)."""
