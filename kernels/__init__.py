"""ember's Triton kernels (installed as ``ember.kernels``).

Kernels and their tensor-level launchers only; op registration, autograd and backend choice live in
``ember.ops``. Importing this package needs triton; ``ember.ops`` imports it lazily.
"""
