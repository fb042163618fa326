"""The fleet controller: worker machines started from the GPU queue's depth, gone when idle.

``vtp controller --backend fly|kubernetes`` runs ``loop.run_controller``: every few seconds it
reads the queue (``queue.read_queue``), asks the backend which machines exist, lets the pure
``decide.decide`` say what should change, and has the backend do it. Machines run
``vtp worker --queue gpu --idle-exit N`` and stop by themselves once the queue drains.

Nothing here imports the speech stack, arq or ``workers.stages``: the controller is a small
process that needs only Redis, the shared core in ``app/`` and an HTTP client (a test pins it).
"""
