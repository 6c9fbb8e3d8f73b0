"""The channel-bilinear softmax ops and every implementation of them, in layers:

- `call`: what a choice depends on (`Call`, `describe`), and the limits implementations check;
- `registry`: every implementation as a table of functions (`IMPLEMENTATIONS`), with the names;
- `rules`: the rule table `auto` follows, as pure data with the measurements behind each row;
- `dispatch`: the choice (a named backend, benchmark mode, the rules; the export fallback);
  `benchmark`: benchmark mode's timing;
- the implementations: `reference` (plain PyTorch, the ground truth), `sdpa` (PyTorch's
  scaled_dot_product_attention), `triton` (fgattn's fused kernels, one module per family).

Callers go through `fgattn.functional`; the global setting is `fgattn.backends`.
"""
