"""What the tests and the benches share, importable as ``tests.support`` from the repository root
(pytest puts the root on the path; the benches run as ``python -m bench.NAME``):

- ``media``: harder media built from the repository's real speech (noise, pauses, music);
- ``wer``: WER as the field computes it, deletion runs (speech lost), runs lost against a yardstick;
- ``dag_cluster``: real worker processes on a real redis-server, and a free port;
- ``fly_standin``: the one stand-in, a local Fly Machines API whose machines run real workers.
"""
