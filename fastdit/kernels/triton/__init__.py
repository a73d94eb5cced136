"""fastdit's Triton kernels, one per file, and the ``triton`` backend that runs them
(:mod:`.backend`): block-sparse attention (:mod:`.attention`, with window masks), its INT8 Q.K^T
variant (:mod:`.int8_attention`), block attention mass (:mod:`.mass`), block mean pooling
(:mod:`.pooling`), INT8 quantization (:mod:`.quantize`); what they share (the key-block loop,
plan rows, launch configurations) is in :mod:`.triton_common`."""
