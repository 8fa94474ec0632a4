"""Training: the one loop (``loop.py``: ``train``, ``Run``) and what it is made of, each a room of its own: the
learning-rate schedule and CUDA switches (``settings.py``), scoring raw and averaged weights (``scoring.py``), a
run's checkpoints (``checkpointing.py``, its state and the protocol they need, ``state.py``; sharded ones,
``sharded_checkpoints.py``), FSDP2 (``sharding.py``), stopping on a signal (``preemption.py``), the progress bar
(``progress.py``) and the memory a run needs (``memory_plan.py``, from ``memory_facts.py``).

``train`` is also ``lawa_suite.train`` (the package's lazy name); the loop module is ``lawa_suite.training.loop``.
"""
