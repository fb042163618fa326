"""The queue runtime: the DAG's stages as arq jobs on Redis, on two queues.

Only this folder imports arq. Each task decodes its message, checks the job's
state, calls the *same* ``workers.stages`` function the local runner calls, stores what the
next stage needs, updates the job record and enqueues the next stage::

    vtp:cpu   extract -> segment ─┐                 ┌─> merge -> render -> notify
    vtp:gpu                       └─> transcribe ×N ┘

**Fan-out / fan-in.** ``segment`` stores the segmentation, sets a counter of batches left
(SET NX, so a retried segment keeps it) and enqueues one ``transcribe`` per batch. Each
``transcribe`` records its result with one Lua script (``JobStore.record_batch``): the batch
index goes into a set of finished batches, and only if it was not there already is the result
stored and the counter decremented. Whoever then reads 0 batches left enqueues ``merge``
under the deterministic arq id ``<job>:merge``, which arq refuses to enqueue twice, so merge
runs once however often a batch is retried or duplicated. Every stage's arq id is
deterministic the same way (``<job>:<stage>[:<batch>]``).

**State first.** Every task reads the job record before doing anything: a job that ended
(done, failed, cancelled: that is how cancel works) or that is already past this stage (a
stale duplicate) makes the task return at once.

**Retries.** A permanent error (``err.permanent``: bad media, bad options) fails the job at
once with its one-line reason. Anything else is retried by raising arq's ``Retry`` with
exponential backoff (``VTP_RETRY_DELAY``, doubling, capped at 60 s) until ``VTP_JOB_TRIES``
tries; the last failure fails the job. arq's own ``max_tries`` is one more than ours, so that a
try that arq starts after its worker was killed (arq counts that try too) still reaches this
code and fails the job cleanly instead of arq dropping it and leaving the record stuck.

**Timeouts and dead workers.** arq marks a running job with ``arq:in-progress:<id>``; if the
worker dies, the job stays in the queue and another worker reruns it when that key expires.
arq sets its TTL once, to the largest function timeout + 10 s (an hour and more with long CPU
stages). Here it is a short lease (``VTP_LEASE``, 60 s) that the worker renews for the stages
it runs (``worker.VtpWorker``): a dead worker's stage reruns within a lease, whatever its length,
while a long, healthy stage keeps its own. Each stage runs under its own deadline
(``VTP_TRANSCRIBE_TIMEOUT`` / ``VTP_CPU_TIMEOUT``) that leaves out time spent waiting for
Redis (``policy.within``); arq's function timeout is a backstop well past it (``policy.BACKSTOP_S``), so a
slow stage is reported and retried here rather than failed by arq without a word. A SIGTERM
(a deploy) drains the worker: the stages in flight finish, and a second signal stops at once
and hands back the tries they were charged (``lifecycle``). Whatever still
leaves a job with no stage queued or running (a submit that died before its enqueue, a
stage arq dropped) is found by the sweeper (``workers.sweeper``, run by every CPU worker,
seen through ``sweep.ArqStages``), which re-drives the stage or fails the job.

**Redis outages.** Every Redis operation of a stage waits through an outage of up to a minute
(``app.redis_outage.retrying``), and the worker's polling loop pauses instead of dying (``worker.VtpWorker``),
so a Redis restart fails nothing: the stages in flight finish once Redis is back. (A Redis
that persists with ``appendonly yes`` has lost nothing meanwhile.) Should arq's loop end
anyway, ``worker.run_worker`` builds a new worker and connects again as soon as Redis answers.

**The files**, from the light end (what the web process and the CLI import) to the worker::

    enqueue.py    Redis clients and enqueueing: the first stage, a webhook, any stage by its id
    policy.py     the policy around every stage: state check, deadline, metering, retry or fail
    tasks.py      the seven arq tasks: each runs its stage and queues the next
    sweep.py      the sweeper's view of arq (``ArqStages``) and the CPU worker's sweep loop
    health.py     a worker's health key: the liveness check, the GPU worker's model and batcher stats
    lifecycle.py  when a worker stops: idle exit, draining on SIGTERM
    worker.py     worker settings per queue, arq's ``Worker`` with our overrides, the reconnect loop

``enqueue`` (and ``health``) import no stage and no speech stack; ``tasks`` and ``worker`` do, at the
top, and only workers import them.
"""
