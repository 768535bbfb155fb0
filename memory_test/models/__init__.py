"""The DiT model shared by the profiling suite, private training and the scripts.

- ``dit_presets``: the size registry (DiT-tiny ... DiT-XL/2, Hub names), validated diffusers configs, size facts.
- ``dit_huggingface_wrapper``: stock diffusers ``DiTTransformer2DModel`` with once-per-sample label dropout and
  local-only weight loading.
- ``attention``: the attention processor that records which SDPA kernel ran.

Import the modules explicitly (the wrapper imports torch and diffusers).
"""
