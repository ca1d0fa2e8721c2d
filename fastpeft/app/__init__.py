"""The fine-tuning application built on the library: the ``fastpeft`` command line and what it runs.

``cli`` (the commands); ``train`` (the training loop) and ``train_config`` (its flags and what they resolve to);
``run_control`` (progress, stopping, divergence); ``run_dir`` and ``outputs`` (output directories: locks, atomic
publishing); ``checkpoint`` (exact resume); ``data``, ``chat``, ``dataset_files`` and ``packing`` (records to
batches); ``evaluate``, ``run_config`` and ``curves`` (eval loss, config files, loss curves); ``distributed``
(torchrun: DDP / FSDP2); ``savers`` and ``seq_chunks`` (activation checkpointing, offloading, sequence chunks);
``memory`` / ``memory_trace`` / ``memory_cli`` (the peak-memory model).

Imports point one way: these modules use the library (``fastpeft.quant``, ``ops``, ``nn``, ``peft``,
``loading``), which never imports them.
"""
