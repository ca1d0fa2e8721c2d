"""The fine-tuning application built on the library: the ``fastpeft`` command line and what it runs.

``cli`` (the commands), ``train`` (the training loop; ``train_config``: its flags and what they resolve to) with ``run_control`` (progress, stopping, divergence),
``run_dir`` and ``outputs`` (output directories: locks, atomic publishing), ``checkpoint`` (exact resume),
``data`` and ``packing`` (JSONL to batches), ``distributed`` (torchrun: DDP / FSDP2), ``savers`` (activation
checkpointing and offloading) and ``memory`` / ``memory_trace`` / ``memory_cli`` (the peak-memory model).

Imports point one way: these modules use the library (``fastpeft.quant``, ``ops``, ``nn``, ``peft``,
``loading``), which never imports them.
"""
