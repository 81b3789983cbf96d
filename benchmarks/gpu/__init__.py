"""The GPU check: one prepared command that proves and times every kernel and the engine.

``bash benchmarks/gpu/check.sh`` (docs/gpu.md says how and where to run it) runs, in order and
each in its own process under its own time budget:

1. :mod:`gpu.ceilings`: the card, the versions, and the two ceilings measured in seconds
   (device-to-device copy bandwidth, a large bf16 matrix product);
2. :mod:`gpu.correctness`: the ``cuda``-marked tests (``tests/test_gpu_*.py``): every kernel
   against its reference, U-Net steps and txt2img with ``NAI_FAST_KERNELS=triton`` against
   ``reference``;
3. :mod:`gpu.kernel_speed`: each kernel against its eager baseline and SDPA's backends;
4. :mod:`gpu.engine`: SD 1.x generation and hypernetwork training, stock diffusers against
   nai_fast, and ``torch.compile`` (a part of its own, last).

Each part writes its records as it goes (:mod:`gpu.record`); :mod:`gpu.check` merges them
into ``$OUT/results.json`` and ``$OUT/results.md`` (:mod:`gpu.report`) after every part.
``--dry-run`` runs it all on the CPU with tiny shapes and the reference path.

Modules here import each other as ``gpu.*``: ``benchmarks/`` is on ``sys.path`` (check.sh
puts it there; pytest does for the benchmark suites, as for ``conftest``).
"""
