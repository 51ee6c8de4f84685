"""The workload simulator: ``python -m hybridkv.sim`` (see :mod:`hybridkv.sim.cli`).

``engine`` drives a MemoryManager with a model-free engine, ``workloads`` and ``trace``
make the requests, ``models`` holds the model presets, ``run`` replays them and measures,
``report`` prints the results. The trace format and the presets: ``docs/simulator.md``.
"""
