"""vtp's workers: the DAG's stages, the engines, and the runners that execute them."""
